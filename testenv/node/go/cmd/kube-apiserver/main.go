// kube-apiserver v1.37.2 as a standalone binary: k8s-testenv embeds one too, but it
// listens on loopback only and turns ServiceAccount admission off, while the node's
// pods must reach it and get service-account tokens (see ../kubelet for why it is
// wrapped here).
package main

import (
	"os"
	_ "time/tzdata"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() { os.Exit(cli.Run(app.NewAPIServerCommand())) }
