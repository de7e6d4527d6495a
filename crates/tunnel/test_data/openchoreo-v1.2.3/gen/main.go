// Writes the v1 tunnel messages as OpenChoreo v1.2.3 builds them (the constructors and struct
// literals of internal/cluster-gateway/{server,exec,wirelogs}.go and
// internal/cluster-agent/{router,exec,hubble}.go), marshalled with Go's encoding/json over a
// verbatim copy of internal/cluster-agent/messaging/types.go.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

const id = "6f1c2a9e-3d8b-4f3e-9a51-2b7c0d4e8f10"
const gw = "gw-5a1b2c3d4e5f6a7b"

func write(dir, name string, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), append(data, '\n'), 0o644); err != nil {
		panic(err)
	}
	fmt.Println(name, string(data))
}

func main() {
	dir := os.Args[1]
	// server.go handleHTTPProxy: NewHTTPTunnelRequest(target, r.Method, targetPath, r.URL.RawQuery, r.Header, body),
	// then GatewayRequestID; SendHTTPTunnelRequestForCR sets RequestID (uuid).
	get := NewHTTPTunnelRequest("k8s", "GET", "/api/v1/namespaces/openchoreo-ci-default/pods",
		"labelSelector=workflows.argoproj.io/workflow=build-1&limit=50",
		map[string][]string{
			"Accept":          {"application/json"},
			"Accept-Encoding": {"gzip"},
			"User-Agent":      {"Go-http-client/1.1"},
			"X-Display-Name":  {"Café <prod> & co"},
		}, nil)
	get.RequestID = id
	get.GatewayRequestID = gw
	write(dir, "gateway-request-get.json", get)

	post := NewHTTPTunnelRequest("k8s", "POST", "/api/v1/namespaces/openchoreo-ci-default/configmaps", "",
		map[string][]string{
			"Content-Length": {"44"},
			"Content-Type":   {"application/json"},
			"User-Agent":     {"Go-http-client/1.1"},
		}, []byte(`{"kind":"ConfigMap","apiVersion":"v1","a":1}`))
	post.RequestID = id
	post.GatewayRequestID = gw
	write(dir, "gateway-request-post.json", post)

	// A request with no headers and no body (omitempty drops both).
	bare := NewHTTPTunnelRequest("k8s", "DELETE", "/api/v1/namespaces/x/configmaps/y", "", nil, nil)
	bare.RequestID = id
	write(dir, "gateway-request-bare.json", bare)

	// exec.go handleExec.
	write(dir, "gateway-stream-init-exec.json", &HTTPTunnelStreamInit{
		RequestID:    gw,
		Target:       "k8s",
		Method:       "POST",
		Path:         "/api/v1/namespaces/default/pods/build-1/exec",
		Query:        "command=sh&stderr=true&stdin=true&stdout=true&tty=true",
		IsUpgrade:    true,
		UpgradeProto: "SPDY/3.1",
	})
	// exec.go: stdin from the API client, then the close when the client goes away.
	write(dir, "gateway-stream-chunk-stdin.json", &HTTPTunnelStreamChunk{RequestID: gw, Data: []byte("\x00ls\n"), StreamID: 0})
	write(dir, "gateway-stream-chunk-close.json", &HTTPTunnelStreamChunk{RequestID: gw, IsClose: true})
	// wirelogs.go handleWirelogs.
	write(dir, "gateway-stream-init-hubble.json", &HTTPTunnelStreamInit{
		RequestID:    gw,
		Target:       "hubble",
		Method:       "GET",
		Path:         "/wirelogs",
		Query:        "environment=dev&namespace=default",
		IsUpgrade:    true,
		UpgradeProto: "hubble/v1",
	})

	req := &HTTPTunnelRequest{RequestID: id}
	// router.go Route: success with the backend's headers and body.
	write(dir, "agent-response-ok.json", NewHTTPTunnelSuccessResponse(req, 200,
		map[string][]string{
			"Audit-Id":      {"0c5d0b1e-8f1a-4a53-9d0e-6e2f1f7b9a10"},
			"Cache-Control": {"no-cache, private"},
			"Content-Type":  {"application/json"},
			"Date":          {"Thu, 20 Aug 2026 10:00:00 GMT"},
		}, []byte(`{"kind":"NamespaceList","apiVersion":"v1","items":[]}`)))
	// A backend 404 (not an agent error): the API server's Status body.
	write(dir, "agent-response-not-found.json", NewHTTPTunnelSuccessResponse(req, 404,
		map[string][]string{"Content-Type": {"application/json"}},
		[]byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`)))
	// An empty body (204, or HEAD): body omitted.
	write(dir, "agent-response-empty.json", NewHTTPTunnelSuccessResponse(req, 204, nil, nil))
	// router.go: unknown target, backend failure.
	write(dir, "agent-error-unknown-target.json", NewHTTPTunnelErrorResponse(req, 404, "unknown target: logs"))
	write(dir, "agent-error-backend.json", NewHTTPTunnelErrorResponse(req, 502,
		"backend request failed: dial tcp 10.43.0.1:443: connect: connection refused"))
	// ErrorDetails.Details is a map[string]any; no v1.2.3 code path sets it, but the type allows it.
	withDetails := NewHTTPTunnelErrorResponse(req, 500, "failed to create request: bad method")
	withDetails.Error.Details = map[string]any{"method": "GET\n", "retryable": false, "attempts": 1}
	write(dir, "agent-error-details.json", withDetails)
	// exec.go: the start chunk, stdout, a failure close, the normal close.
	write(dir, "agent-stream-chunk-exec-start.json", &HTTPTunnelStreamChunk{RequestID: gw, Data: []byte{1}, StreamID: 1})
	write(dir, "agent-stream-chunk-stdout.json", &HTTPTunnelStreamChunk{RequestID: gw, Data: []byte("\x01hello\n"), StreamID: 1})
	write(dir, "agent-stream-chunk-close-error.json", &HTTPTunnelStreamChunk{RequestID: gw, IsClose: true,
		Data: []byte("failed to create executor: unknown scheme")})
	write(dir, "agent-stream-chunk-close.json", &HTTPTunnelStreamChunk{RequestID: gw, IsClose: true})
	// hubble.go: the sentinel chunk (empty, not nil, data).
	write(dir, "agent-stream-chunk-hubble-sentinel.json", &HTTPTunnelStreamChunk{RequestID: gw, Data: []byte{}})
}
