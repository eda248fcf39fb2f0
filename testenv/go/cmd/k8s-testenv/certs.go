package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki is everything the API server and its admin client need, written under dir.
// It is generated fresh for every run: nothing is shared between test runs.
type pki struct {
	caCert, serverCert, serverKey, saKey string // file paths
	caPEM, adminCertPEM, adminKeyPEM     []byte // inlined into the kubeconfig
}

type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func generatePKI(dir string) (*pki, error) {
	ca, err := newCert("k8s-testenv-ca", nil, nil)
	if err != nil {
		return nil, err
	}
	server, err := newCert("kube-apiserver", nil, ca)
	if err != nil {
		return nil, err
	}
	// system:masters is bound to cluster-admin by the bootstrap RBAC policy.
	admin, err := newCert("k8s-testenv-admin", []string{"system:masters"}, ca)
	if err != nil {
		return nil, err
	}
	// Service-account tokens (TokenRequest) are signed with this key. RSA in PKCS#1
	// is the format every apiserver key loader accepts.
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}

	p := &pki{
		caCert:       filepath.Join(dir, "ca.crt"),
		serverCert:   filepath.Join(dir, "apiserver.crt"),
		serverKey:    filepath.Join(dir, "apiserver.key"),
		saKey:        filepath.Join(dir, "sa.key"),
		caPEM:        certPEM(ca),
		adminCertPEM: certPEM(admin),
	}
	if p.adminKeyPEM, err = keyPEM(admin); err != nil {
		return nil, err
	}
	serverKeyPEM, err := keyPEM(server)
	if err != nil {
		return nil, err
	}
	saKeyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)})
	for path, data := range map[string][]byte{
		p.caCert: p.caPEM, p.serverCert: certPEM(server), p.serverKey: serverKeyPEM, p.saKey: saKeyPEM,
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// newCert makes a self-signed CA when parent is nil, otherwise a leaf signed by parent
// that is valid both as the loopback serving cert and as a client cert.
func newCert(cn string, orgs []string, parent *keyPair) (*keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		BasicConstraintsValid: true,
	}
	signer, signerCert := crypto.Signer(key), tmpl
	if parent == nil {
		tmpl.IsCA = true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	} else {
		signer, signerCert = parent.key, parent.cert
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		// Clients must connect by IP: our Rust binaries are static glibc and cannot
		// resolve names through NSS.
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signerCert, key.Public(), signer)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &keyPair{cert: cert, key: key}, nil
}

func certPEM(kp *keyPair) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: kp.cert.Raw})
}

// keyPEM uses PKCS#8, which both Go and rustls (kube-rs) read.
func keyPEM(kp *keyPair) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(kp.key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
