module github.com/enterprise-agent-operator/node

go 1.24.0
