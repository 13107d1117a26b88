// Command kstatus prints how Flux (and kpt, and cli-utils) read an object's status: it reads one
// JSON object per line on stdin and writes, per line, the kstatus result as JSON. It is the upstream
// library at a pinned version, so our tests check our status against the real reader, not our idea
// of it.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type reading struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	encoder := json.NewEncoder(os.Stdout)
	for scanner.Scan() {
		object := map[string]interface{}{}
		// The apimachinery decoder keeps whole numbers int64, as objects from the API server are.
		if err := utiljson.Unmarshal(scanner.Bytes(), &object); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: not a JSON object: %v\n", err)
			os.Exit(2)
		}
		result, err := status.Compute(&unstructured.Unstructured{Object: object})
		out := reading{}
		if err != nil {
			out.Error = err.Error()
		} else {
			out.Status = result.Status.String()
			out.Message = result.Message
		}
		if err := encoder.Encode(out); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
			os.Exit(1)
		}
	}
	if err := scanner.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(1)
	}
}
