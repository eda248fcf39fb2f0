// cni-runtime drives a CNI network through the reference libcni, as a container
// runtime does, so tests exercise our plugin exactly as kubelet/containerd would.
//
//	cni-runtime (--conflist FILE | --net-dir DIR) --bin-dir DIR [--bin-dir DIR ...] --cache-dir DIR
//	    [--netns PATH --container-id ID --ifname eth0 --pod-namespace NS --pod-name NAME --pod-uid UID]
//	    [--capability-args JSON] add|check|del|status|gc [--valid-attachment ID:IFNAME ...]
//
// Flags may come before or after the command. On success it exits 0 and prints the
// result JSON (add only). When a plugin returns a CNI error it prints that error's JSON
// ({"code":..,"msg":..,"details":..}) on stdout and exits 2; any other failure (bad
// flags, unreadable config, plugin binary missing) goes to stderr with exit 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

const exitPluginError = 2

func main() {
	var binDirs, validAttachments stringList
	conflist := flag.String("conflist", "", "network configuration list (.conflist, or a single-plugin .conf)")
	netDir := flag.String("net-dir", "", "load the first valid config of this dir, as kubelet/containerd do")
	flag.Var(&binDirs, "bin-dir", "plugin binary dir (repeatable, searched in order)")
	cacheDir := flag.String("cache-dir", "", "libcni result cache dir (required; keeps tests off /var/lib/cni)")
	netns := flag.String("netns", "", "network namespace path, e.g. /var/run/netns/NAME")
	containerID := flag.String("container-id", "", "sandbox container ID")
	ifName := flag.String("ifname", "eth0", "interface name inside the netns")
	podNS := flag.String("pod-namespace", "", "K8S_POD_NAMESPACE")
	podName := flag.String("pod-name", "", "K8S_POD_NAME")
	podUID := flag.String("pod-uid", "", "K8S_POD_UID")
	capArgs := flag.String("capability-args", "", `runtime capability args as JSON, e.g. {"portMappings":[...]}`)
	timeout := flag.Duration("timeout", 60*time.Second, "give up after this long")
	flag.Var(&validAttachments, "valid-attachment", "gc: attachment to keep, CONTAINER_ID:IFNAME (repeatable)")
	flag.Parse()
	// Let flags follow the command too ("... gc --valid-attachment X:eth0").
	command := flag.Arg(0)
	if err := flag.CommandLine.Parse(flag.Args()[min(1, flag.NArg()):]); err != nil || flag.NArg() != 0 {
		usage("unexpected arguments: %v", flag.Args())
	}
	if len(binDirs) == 0 || *cacheDir == "" || (*conflist == "") == (*netDir == "") {
		usage("need --bin-dir, --cache-dir and exactly one of --conflist/--net-dir")
	}

	list, err := loadConfig(*conflist, *netDir)
	if err != nil {
		fail(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(binDirs, *cacheDir, nil)
	rt := &libcni.RuntimeConf{
		ContainerID: *containerID,
		NetNS:       *netns,
		IfName:      *ifName,
		CacheDir:    *cacheDir,
		// What kubelet passes (pkg/kubelet/dockershim network/cni, now in the CRI runtimes).
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", *podNS},
			{"K8S_POD_NAME", *podName},
			{"K8S_POD_INFRA_CONTAINER_ID", *containerID},
			{"K8S_POD_UID", *podUID},
		},
	}
	if *capArgs != "" {
		if err := json.Unmarshal([]byte(*capArgs), &rt.CapabilityArgs); err != nil {
			usage("--capability-args: %v", err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	switch command {
	case "add":
		var result types.Result
		if result, err = cni.AddNetworkList(ctx, list, rt); err == nil {
			err = result.Print()
		}
	case "check":
		err = cni.CheckNetworkList(ctx, list, rt)
	case "del":
		err = cni.DelNetworkList(ctx, list, rt)
	case "status":
		err = cni.GetStatusNetworkList(ctx, list)
	case "gc":
		args := &libcni.GCArgs{}
		for _, a := range validAttachments {
			id, ifname, ok := strings.Cut(a, ":")
			if !ok {
				usage("--valid-attachment %q: want CONTAINER_ID:IFNAME", a)
			}
			args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: id, IfName: ifname})
		}
		err = cni.GCNetworkList(ctx, list, args)
	default:
		usage("unknown command %q (want add|check|del|status|gc)", command)
	}
	if err != nil {
		fail(err)
	}
}

// loadConfig follows kubelet/containerd (go-cni): files of the net dir in sorted
// order, the first one that parses and has plugins wins; a .conf is wrapped into a list.
func loadConfig(conflist, netDir string) (*libcni.NetworkConfigList, error) {
	if conflist != "" {
		return loadFile(conflist)
	}
	files, err := libcni.ConfFiles(netDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, err
	}
	sort.Strings(files)
	for _, f := range files {
		list, err := loadFile(f)
		if err != nil {
			fmt.Fprintf(os.Stderr, "cni-runtime: skipping %s: %v\n", f, err)
			continue
		}
		if len(list.Plugins) > 0 {
			return list, nil
		}
	}
	return nil, libcni.NoConfigsFoundError{Dir: netDir}
}

func loadFile(path string) (*libcni.NetworkConfigList, error) {
	if strings.HasSuffix(path, ".conflist") {
		return libcni.ConfListFromFile(path)
	}
	conf, err := libcni.ConfFromFile(path)
	if err != nil {
		return nil, err
	}
	if conf.Network.Type == "" {
		return nil, fmt.Errorf("%s: no plugin type", path)
	}
	return libcni.ConfListFromConf(conf)
}

// fail prints a plugin's CNI error as JSON on stdout (exit 2), so tests can assert the
// code; anything else is a plain message on stderr (exit 1).
func fail(err error) {
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		_ = json.NewEncoder(os.Stdout).Encode(cniErr)
		fmt.Fprintln(os.Stderr, "cni-runtime:", err)
		os.Exit(exitPluginError)
	}
	fmt.Fprintln(os.Stderr, "cni-runtime:", err)
	os.Exit(1)
}

func usage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cni-runtime: "+format+"\n", args...)
	flag.Usage()
	os.Exit(1)
}
