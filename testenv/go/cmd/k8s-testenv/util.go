package main

import (
	"encoding/base64"
	neturl "net/url"
)

type url = neturl.URL

func mustURL(s string) url {
	u, err := neturl.Parse(s)
	if err != nil {
		panic(err)
	}
	return *u
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
