//go:build tools

// Package tools pins CoreDNS, which `eao-dev cluster up --real-node` builds as the cluster DNS
// (the kubernetes plugin serves Service names to pods on the real node).
package tools

import _ "github.com/coredns/coredns"
