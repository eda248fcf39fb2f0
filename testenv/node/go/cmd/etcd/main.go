// etcd v3.7.0 for the node's API server (its module replaces its siblings with local
// paths too, so it cannot be installed with `go install pkg@version`).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
