// Command kube-apiserver is the upstream kube-apiserver, built from k8s.io/kubernetes at the
// version pinned in go.mod. It adds nothing: it exists so that `go build` can make the binary.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
