// k8s-testenv runs a real etcd and a real kube-apiserver (Kubernetes v1.37.2, both
// compiled into this binary) on loopback for integration tests, the way envtest does.
//
//	k8s-testenv --kubeconfig PATH [--crd FILE ...] [--apiserver-arg=--flag=value ...]
//
// It writes an admin (system:masters) kubeconfig to PATH, prints "READY PATH" on
// stdout once the API answers /readyz and every --crd is Established, and runs until
// SIGTERM/SIGINT or until its stdin reaches EOF (so that it dies with the test process
// that holds the pipe). On the way out it stops both servers and removes its data dir
// (with everything in it: a caller may put its kubeconfig and logs there too).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensions "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	var crds, extraArgs stringList
	kubeconfig := flag.String("kubeconfig", "", "write the admin kubeconfig here (required)")
	dataDir := flag.String("data-dir", "", "working dir for certs and etcd, created if missing and removed on exit (default: a new temp dir)")
	exitOnEOF := flag.Bool("exit-on-stdin-eof", true, "exit when stdin reaches EOF (set false when backgrounding from a shell with stdin on /dev/null)")
	flag.Var(&crds, "crd", "CustomResourceDefinition YAML file to install before READY (repeatable)")
	flag.Var(&extraArgs, "apiserver-arg", "extra kube-apiserver flag, e.g. --apiserver-arg=--v=4 (repeatable)")
	flag.Parse()
	if *kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "k8s-testenv: --kubeconfig is required")
		os.Exit(2)
	}

	// Created first: it installs the SIGTERM/SIGINT handler that cancels ctx (a second
	// signal exits at once), so a signal during etcd start-up is honoured too.
	cmd := app.NewAPIServerCommand()
	ctx := cmd.Context()
	if *exitOnEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		}()
	}

	var err error
	if *dataDir == "" {
		*dataDir, err = os.MkdirTemp("", "k8s-testenv-")
	} else {
		err = os.MkdirAll(*dataDir, 0o700)
	}
	if err != nil {
		fatal(err)
	}
	err = run(ctx, cmd.Execute, cmd.SetArgs, *dataDir, *kubeconfig, crds, extraArgs)
	// Remove the data dir even if a server did not stop in time.
	if rmErr := os.RemoveAll(*dataDir); rmErr != nil {
		fmt.Fprintln(os.Stderr, "k8s-testenv: removing data dir:", rmErr)
	}
	if err != nil && ctx.Err() == nil {
		fatal(err)
	}
	fmt.Fprintln(os.Stderr, "k8s-testenv: stopped")
}

func run(ctx context.Context, execute func() error, setArgs func([]string), dataDir, kubeconfig string, crds, extraArgs []string) error {
	certs, err := generatePKI(dataDir)
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}
	etcd, etcdURL, err := startEtcd(ctx, filepath.Join(dataDir, "etcd"))
	if err != nil {
		return err
	}
	defer etcd.Close()

	port, err := freePort()
	if err != nil {
		return err
	}
	setArgs(append([]string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + dataDir,
		"--tls-cert-file=" + certs.serverCert,
		"--tls-private-key-file=" + certs.serverKey,
		"--client-ca-file=" + certs.caCert,
		// RBAC, so that a missing rule in our chart fails a test.
		"--authorization-mode=Node,RBAC",
		// Bound service-account tokens (TokenRequest) need an issuer and a signing key.
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + certs.saKey,
		"--service-account-signing-key-file=" + certs.saKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		// No controller-manager runs, so nothing creates the "default" service account
		// that this plugin would demand of every pod.
		"--disable-admission-plugins=ServiceAccount",
		// The "kubernetes" Service endpoints must not be loopback; nothing here uses them.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--v=0",
	}, extraArgs...))

	apiErr := make(chan error, 1)
	go func() { apiErr <- execute() }()

	cfg := &rest.Config{
		Host: fmt.Sprintf("https://127.0.0.1:%d", port),
		TLSClientConfig: rest.TLSClientConfig{
			CAData: certs.caPEM, CertData: certs.adminCertPEM, KeyData: certs.adminKeyPEM,
		},
		QPS: 100, Burst: 200,
	}
	readyCtx, cancelReady := context.WithCancel(ctx)
	go func() {
		select {
		case <-readyCtx.Done():
		case err := <-apiErr:
			apiErr <- err // hand it on to the final wait below
			cancelReady()
		}
	}()
	err = waitReady(readyCtx, cfg)
	if err == nil {
		err = installCRDs(readyCtx, cfg, crds)
	}
	if err == nil {
		err = writeKubeconfig(kubeconfig, cfg)
	}
	cancelReady()
	if err != nil {
		if ctx.Err() == nil {
			select { // prefer the API server's own reason for failing
			case apiErr := <-apiErr:
				return fmt.Errorf("kube-apiserver: %w", apiErr)
			default:
			}
		}
		return err
	}
	fmt.Println("READY", kubeconfig)

	select {
	case err := <-apiErr:
		if ctx.Err() == nil {
			return fmt.Errorf("kube-apiserver exited: %w", err)
		}
	case <-ctx.Done():
		// Graceful shutdown normally takes a second or two; do not hang a test run on it.
		select {
		case <-apiErr:
		case <-time.After(30 * time.Second):
			return errors.New("kube-apiserver did not stop within 30s")
		}
	}
	return nil
}

func startEtcd(ctx context.Context, dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Name = "k8s-testenv"
	cfg.Dir = dir
	cfg.LogLevel = "error"
	cfg.UnsafeNoFsync = true // throw-away data: fsync only costs time
	clientURL := mustURL(fmt.Sprintf("http://127.0.0.1:%d", clientPort))
	peerURL := mustURL(fmt.Sprintf("http://127.0.0.1:%d", peerPort))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url{clientURL}, []url{clientURL}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url{peerURL}, []url{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("starting etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, clientURL.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", fmt.Errorf("etcd: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", errors.New("etcd not ready after 60s")
	case <-ctx.Done():
		e.Close()
		return nil, "", ctx.Err()
	}
}

// waitReady polls /readyz, which turns OK only after every post-start hook has run
// (bootstrap RBAC roles included).
func waitReady(ctx context.Context, cfg *rest.Config) error {
	transport, err := rest.TransportFor(cfg)
	if err != nil {
		return err
	}
	client := &http.Client{Transport: transport, Timeout: 5 * time.Second}
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, cfg.Host+"/readyz", nil)
		resp, err := client.Do(req)
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// installCRDs creates each CRD of each (possibly multi-document) YAML file and waits
// until it is Established, i.e. served: tests may create its objects right after READY.
func installCRDs(ctx context.Context, cfg *rest.Config, files []string) error {
	client, err := apiextensions.NewForConfig(cfg)
	if err != nil {
		return err
	}
	for _, file := range files {
		f, err := os.Open(file)
		if err != nil {
			return err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
		for {
			var crd apiextensionsv1.CustomResourceDefinition
			if err := dec.Decode(&crd); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				f.Close()
				return fmt.Errorf("%s: %w", file, err)
			}
			if crd.Name == "" {
				continue // empty YAML document
			}
			if _, err := client.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, &crd, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				f.Close()
				return fmt.Errorf("creating CRD %s from %s: %w", crd.Name, file, err)
			}
			err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
				got, err := client.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
				if err != nil {
					return false, nil
				}
				for _, c := range got.Status.Conditions {
					if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
						return true, nil
					}
				}
				return false, nil
			})
			if err != nil {
				f.Close()
				return fmt.Errorf("CRD %s not Established: %w", crd.Name, err)
			}
		}
		f.Close()
	}
	return nil
}

var kubeconfigTemplate = template.Must(template.New("").Parse(`apiVersion: v1
kind: Config
clusters:
- name: k8s-testenv
  cluster:
    server: {{.Host}}
    certificate-authority-data: {{.CA}}
users:
- name: admin
  user:
    client-certificate-data: {{.Cert}}
    client-key-data: {{.Key}}
contexts:
- name: admin@k8s-testenv
  context:
    cluster: k8s-testenv
    user: admin
current-context: admin@k8s-testenv
`))

// writeKubeconfig writes atomically (temp file + rename): a reader never sees half a file.
func writeKubeconfig(path string, cfg *rest.Config) error {
	var b strings.Builder
	err := kubeconfigTemplate.Execute(&b, map[string]string{
		"Host": cfg.Host,
		"CA":   b64(cfg.CAData), "Cert": b64(cfg.CertData), "Key": b64(cfg.KeyData),
	})
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// freePort asks the kernel for an unused loopback port. Another process could take it
// before we bind it again; on loopback in a test machine that race is rare enough.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "k8s-testenv:", err)
	os.Exit(1)
}
