// Command etcd is the upstream etcd server at the version pinned in this module's go.mod.
// Debian bookworm ships etcd 3.4, older than the 3.5+ that Kubernetes 1.34 supports, so we build it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
