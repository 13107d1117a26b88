//go:build tools

// Package tools pins kube-router, which `eao-dev cluster up --real-node` runs as the node's
// NetworkPolicy controller (firewall only: no routing, no service proxy, no CNI).
package tools

import _ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
