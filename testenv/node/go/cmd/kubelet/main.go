// kubelet v1.37.2, built from the Go module: k8s.io/kubernetes cannot be installed with
// `go install pkg@version` (its go.mod replaces the staging modules with local paths).
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() { os.Exit(cli.Run(app.NewKubeletCommand(context.Background()))) }
