//! The gateway's behaviour, one test per rule, against the echo service:
//! each request's resulting gRPC message comes back, so the assertions read
//! what the service really received. Most run in both shapes: the echo
//! service in-process and behind a real gRPC socket.

#![expect(clippy::unwrap_used, reason = "tests")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use plinth_gateway::testing::{ECHO_DESCRIPTOR_SET, EchoServer};
use plinth_gateway::{Gateway, GatewayOptions, Upstreams};
use plinth_runtime::Tasks;
use plinth_runtime::resilience::RateLimiter;
use plinth_runtime::state::InProcessState;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

struct Edge {
    base: String,
    echo: EchoServer,
    http: reqwest::Client,
    _tasks: Tasks,
}

impl Edge {
    async fn start(remote: bool, options: GatewayOptions) -> Edge {
        let tasks = Tasks::new();
        let echo = EchoServer::new().unwrap();
        let upstreams = if remote {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tonic::transport::Server::builder()
                .add_service(echo.clone())
                .serve_with_incoming(plinth_runtime::server::incoming(listener));
            tasks.spawn("echo-grpc", server);
            Upstreams::new()
                .remote("gatewaytest", &format!("http://{addr}"))
                .unwrap()
        } else {
            Upstreams::new().in_process(echo.clone(), &["gatewaytest"])
        };
        let gateway = Gateway::new(ECHO_DESCRIPTOR_SET, upstreams, options).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = gateway.router().into_make_service_with_connect_info::<SocketAddr>();
        tasks.spawn("gateway", async move { axum::serve(listener, app).await });
        Edge {
            base: format!("http://{addr}"),
            echo,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            _tasks: tasks,
        }
    }

    async fn both() -> [Edge; 2] {
        [
            Edge::start(false, GatewayOptions::default()).await,
            Edge::start(true, GatewayOptions::default()).await,
        ]
    }

    fn req(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.base),
        )
    }

    async fn json(&self, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b.to_owned());
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text)
                .map_err(|e| format!("not JSON: {text}: {e}"))
                .unwrap(),
        )
    }
}

fn violation(body: &Value) -> String {
    body["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .map(|d| d["fieldViolations"][0]["field"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn path_templates_capture_and_decode_as_the_spec_says() {
    for edge in Edge::both().await {
        let (s, b) = edge.json("GET", "/v1/echo/a%20b", None).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["id"], "a b", "single-segment variables decode everything");

        let (_, b) = edge.json("GET", "/v1/shelves/s1/books/b%2F2", None).await;
        assert_eq!(b["name"], "shelves/s1/books/b%2F2", "multi-segment variables keep %2F");

        let (_, b) = edge.json("GET", "/v1/files/a/b/c.txt", None).await;
        assert_eq!(b["path"], "a/b/c.txt", "** captures several segments");

        let (s, b) = edge.json("POST", "/v1/ops/o1:cancel", Some("{}")).await;
        assert_eq!(s, 200);
        assert_eq!(b["name"], "ops/o1", "verbs are a suffix of the last segment");

        let (s, b) = edge.json("SEARCH", "/v1/echo:search?id=q", None).await;
        assert_eq!((s, b["id"].clone()), (StatusCode::OK, json!("q")), "custom verbs route");

        let (s, b) = edge
            .json(
                "POST",
                "/plinth.gatewaytest.v1.EchoService/Unbound",
                Some(r#"{"id":"u"}"#),
            )
            .await;
        assert_eq!(
            (s, b["id"].clone()),
            (StatusCode::OK, json!("u")),
            "implicit POST /pkg.Svc/Method"
        );
    }
}

#[tokio::test]
async fn body_then_path_then_query_and_star_body_ignores_the_query() {
    for edge in Edge::both().await {
        // body: "note" — the rest comes from the path and the query.
        let (s, b) = edge
            .json(
                "POST",
                "/v1/echo/p1/note?id=from-query&count=5&note.text=ignored",
                Some(r#"{"text":"hi","tags":["x"]}"#),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["id"], "p1", "the path wins over the query");
        assert_eq!(
            b["note"],
            json!({"text": "hi", "tags": ["x"]}),
            "the body field, not the query"
        );
        assert_eq!(b["count"], "5", "unbound fields come from the query");

        // body: "*" — the path wins over the body, the query is not read.
        let (_, b) = edge
            .json("POST", "/v1/ops/o9:cancel?count=7", Some(r#"{"name":"body","id":"b"}"#))
            .await;
        assert_eq!(b["name"], "ops/o9", "the path wins over the body");
        assert_eq!(b["id"], "b");
        assert_eq!(b["count"], "0", "body * means no query parsing");

        // A repeated body field takes a JSON array.
        let (_, b) = edge.json("POST", "/v1/echo/t/tags", Some(r#"["a","b"]"#)).await;
        assert_eq!(b["tags"], json!(["a", "b"]));
    }
}

#[tokio::test]
async fn query_parameters_cover_every_kind() {
    let edge = Edge::start(false, GatewayOptions::default()).await;
    let query = "count=5&small=3&ratio=0.5&flag=t&kind=KIND_LOUD&tags=a&tags=b&labels[env]=prod\
                 &when=2024-01-02T03:04:05Z&ttl=1h2m&limit=7&mask=note.text,count&data=aGk\
                 &nested.a=n&nested.b=2&numbers=1&numbers=2&codes[5]=five&left=l&unknown.key=1";
    let (s, b) = edge.json("GET", &format!("/v1/echo/q?{query}"), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["count"], "5", "int64 is a string in JSON");
    assert_eq!(b["small"], 3);
    assert_eq!(b["ratio"], 0.5);
    assert_eq!(b["flag"], true);
    assert_eq!(b["kind"], "KIND_LOUD");
    assert_eq!(b["tags"], json!(["a", "b"]));
    assert_eq!(b["labels"], json!({"env": "prod"}));
    assert_eq!(b["when"], "2024-01-02T03:04:05Z");
    assert_eq!(b["ttl"], "3720s");
    assert_eq!(b["limit"], 7);
    assert_eq!(b["mask"], "note.text,count");
    assert_eq!(b["data"], "aGk=");
    assert_eq!(b["nested"], json!({"a": "n", "b": 2}));
    assert_eq!(b["numbers"], json!([1, 2]));
    assert_eq!(b["codes"], json!({"5": "five"}));
    assert_eq!(b["left"], "l");

    // JSON names and enum numbers are accepted too.
    let (_, b) = edge.json("GET", "/v1/echo/q?kind=2&nested.b=4&ttl=1.5s", None).await;
    assert_eq!(b["kind"], "KIND_QUIET");
    assert_eq!(b["ttl"], "1.500s");

    // Unpopulated fields are emitted.
    let (_, b) = edge.json("GET", "/v1/echo/empty", None).await;
    assert_eq!(b["flag"], false);
    assert_eq!(b["tags"], json!([]));
    assert_eq!(b["count"], "0");
    assert_eq!(b["kind"], "KIND_UNSPECIFIED");
}

#[tokio::test]
async fn bad_query_values_are_400_naming_the_parameter() {
    let edge = Edge::start(false, GatewayOptions::default()).await;
    for (query, field) in [
        ("count=1&count=2", "count"),
        ("count=abc", "count"),
        ("small=-1", "small"),
        ("kind=KIND_NOPE", "kind"),
        ("left=a&right=b", "right"),
        ("ttl=5parsecs", "ttl"),
        ("when=yesterday", "when"),
        ("flag=maybe", "flag"),
        ("labels[a]=1&labels[a]=2", "labels"),
    ] {
        let (s, b) = edge.json("GET", &format!("/v1/echo/x?{query}"), None).await;
        assert_eq!(s, 400, "{query}: {b}");
        assert_eq!(b["code"], 3, "{query}");
        assert_eq!(violation(&b), field, "{query}: {b}");
    }
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_field_and_big_ones_413() {
    let options = GatewayOptions {
        body_limit: 1024,
        ..GatewayOptions::default()
    };
    let edge = Edge::start(false, options).await;
    let (s, b) = edge.json("POST", "/v1/echo", Some(r#"{"count": "abc"}"#)).await;
    assert_eq!((s, b["code"].clone()), (StatusCode::BAD_REQUEST, json!(3)), "{b}");
    assert_eq!(violation(&b), "count");
    let (_, b) = edge.json("POST", "/v1/echo", Some(r#"{"nested": {"b": "x"}}"#)).await;
    assert_eq!(violation(&b), "nested.b", "{b}");
    let (s, b) = edge.json("POST", "/v1/echo", Some(r#"{"id": "x""#)).await;
    assert_eq!((s, violation(&b)), (StatusCode::BAD_REQUEST, "body".into()), "{b}");
    // Unknown fields are ignored, as grpc-gateway does.
    let (s, b) = edge.json("POST", "/v1/echo", Some(r#"{"id": "x", "nope": 1}"#)).await;
    assert_eq!((s, b["id"].clone()), (StatusCode::OK, json!("x")));

    let big = format!(r#"{{"id": "{}"}}"#, "x".repeat(2000));
    let (s, b) = edge.json("POST", "/v1/echo", Some(&big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(b["code"], 8);

    let (s, b) = edge.json("GET", "/v1/nothing/here", None).await;
    assert_eq!((s, b["code"].clone()), (StatusCode::NOT_FOUND, json!(5)));
    assert_eq!(b["details"], json!([]));

    let resp = edge.req("DELETE", "/v1/echo/x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(resp.headers()["allow"].to_str().unwrap().contains("GET"));
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["code"], 12);
}

#[tokio::test]
async fn patch_without_update_mask_takes_the_json_keys() {
    for edge in Edge::both().await {
        let (s, b) = edge
            .json(
                "PATCH",
                "/v1/echo/m1",
                Some(r#"{"note": {"text": "x"}, "count": "0", "flag": false}"#),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let mut mask: Vec<&str> = b["updateMask"].as_str().unwrap().split(',').collect();
        mask.sort_unstable();
        assert_eq!(
            mask,
            ["count", "flag", "note.text"],
            "explicit zero values are in the mask"
        );
        assert_eq!(b["message"]["id"], "m1");

        let (_, b) = edge
            .json(
                "PATCH",
                "/v1/echo/m1?updateMask=count",
                Some(r#"{"count": "3", "flag": true}"#),
            )
            .await;
        assert_eq!(b["updateMask"], "count", "a mask the client sent is kept");
    }
}

#[tokio::test]
async fn errors_carry_status_details_and_the_canonical_http_status() {
    for edge in Edge::both().await {
        let (s, b) = edge
            .json(
                "POST",
                "/v1/fail",
                Some(r#"{"code": 5, "message": "gone", "withDetails": true}"#),
            )
            .await;
        assert_eq!(s, 404);
        assert_eq!(b["code"], 5);
        assert_eq!(b["message"], "gone");
        let info = b["details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
            .ok_or_else(|| format!("no ErrorInfo in {b}"))
            .unwrap();
        assert_eq!(info["reason"], "ECHO_FAILED");
        assert_eq!(info["metadata"]["asked"], "NotFound");
        assert_eq!(violation(&b), "code");

        for (code, http) in [
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
        ] {
            let resp = edge
                .req("POST", "/v1/fail")
                .body(format!(r#"{{"code": {code}, "message": "m"}}"#))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), http, "gRPC code {code}");
            assert_eq!(
                resp.headers()["grpc-metadata-x-fail"],
                "yes",
                "error metadata is forwarded"
            );
            if code == 16 {
                assert!(
                    resp.headers()["www-authenticate"]
                        .to_str()
                        .unwrap()
                        .starts_with("Bearer")
                );
            }
            let b: Value = resp.json().await.unwrap();
            assert_eq!(b["code"], code);
        }
    }
}

#[tokio::test]
async fn headers_become_metadata_and_back() {
    for edge in Edge::both().await {
        let resp = edge
            .req("GET", "/v1/headers")
            .header("authorization", "Bearer abc")
            .header("grpc-metadata-tenant", "t1")
            .header("grpc-metadata-blob-bin", "AQI")
            .header("x-forwarded-for", "10.0.0.1")
            .header("if-match", "\"etag-1\"")
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .header("x-request-id", "req-42")
            .header("x-not-forwarded", "secret")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-request-id"], "req-42");
        assert_eq!(resp.headers()["grpc-metadata-x-echo"], "yes");
        assert!(resp.headers().contains_key("grpc-metadata-x-echo-bin"));
        let b: Value = resp.json().await.unwrap();
        let md = &b["metadata"];
        assert_eq!(md["authorization"], "Bearer abc");
        assert_eq!(md["tenant"], "t1", "Grpc-Metadata- is stripped");
        assert_eq!(md["blob-bin"], "AQI=", "-Bin values are base64-decoded to bytes");
        assert_eq!(md["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert!(md["x-forwarded-host"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(md["grpcgateway-if-match"], "\"etag-1\"");
        assert_eq!(
            md["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(md["x-request-id"], "req-42");
        assert!(md.get("x-not-forwarded").is_none(), "other headers are dropped");

        let resp = edge.req("GET", "/v1/headers").send().await.unwrap();
        let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(generated.len(), 36, "a request id is generated when absent");
        let b: Value = resp.json().await.unwrap();
        assert_eq!(b["metadata"]["x-request-id"], generated.as_str());
    }
}

#[tokio::test]
async fn grpc_timeout_and_the_default_deadline_give_504() {
    let options = GatewayOptions {
        default_timeout: Duration::from_millis(300),
        ..GatewayOptions::default()
    };
    for remote in [false, true] {
        let edge = Edge::start(remote, options.clone()).await;
        let started = Instant::now();
        let resp = edge
            .req("GET", "/v1/slow?millis=5000")
            .header("grpc-timeout", "100m")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 504);
        assert!(started.elapsed() < Duration::from_secs(2));
        let (s, b) = edge.json("GET", "/v1/slow?millis=5000", None).await;
        assert_eq!((s, b["code"].clone()), (StatusCode::GATEWAY_TIMEOUT, json!(4)));
        let (s, _) = edge.json("GET", "/v1/slow?millis=10", None).await;
        assert_eq!(s, 200);
        let resp = edge
            .req("GET", "/v1/slow")
            .header("grpc-timeout", "soon")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
}

#[tokio::test]
async fn server_streams_are_ndjson_or_sse_and_end_with_an_error_envelope() {
    for edge in Edge::both().await {
        let resp = edge.req("GET", "/v1/stream?count=3").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let text = resp.text().await.unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[2]["result"]["count"], "2");

        let text = edge
            .req("GET", "/v1/stream?count=2&failAtEnd=true")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], 10, "{text}");

        let resp = edge
            .req("GET", "/v1/stream?count=2")
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        assert_eq!(text.matches("data: {").count(), 2, "{text}");

        // An error before the first message keeps its own status.
        let (s, b) = edge.json("GET", "/v1/stream?count=-1", None).await;
        assert_eq!((s, b["code"].clone()), (StatusCode::BAD_REQUEST, json!(3)));
    }
}

#[tokio::test]
async fn a_quiet_stream_answers_its_status_line_without_waiting_for_a_message() {
    for edge in Edge::both().await {
        let started = Instant::now();
        let resp = edge
            .req("GET", "/v1/stream?count=1&firstDelayMillis=4000")
            .send()
            .await
            .unwrap();
        let headers_after = started.elapsed();
        assert_eq!(resp.status(), 200);
        assert!(
            headers_after < Duration::from_millis(2500),
            "the status line waited {headers_after:?} for the first message"
        );
        let body = resp.text().await.unwrap();
        assert!(body.starts_with("{\"result\""), "the message follows: {body}");
        assert!(
            started.elapsed() >= Duration::from_millis(3900),
            "the message came after {:?}: {body}",
            started.elapsed()
        );
        // An error before any message still gets its own status.
        let (status, _) = edge.json("GET", "/v1/stream?count=-1", None).await;
        assert_eq!(status, 400);
    }
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_stream() {
    for edge in Edge::both().await {
        let resp = edge
            .req("GET", "/v1/stream?count=1000&intervalMillis=20")
            .send()
            .await
            .unwrap();
        let mut body = resp.bytes_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"{\"result\""), "messages are flushed one by one");
        assert_eq!(edge.echo.live_streams(), 1);
        drop(body);
        let deadline = Instant::now() + Duration::from_secs(5);
        while edge.echo.live_streams() > 0 {
            assert!(Instant::now() < deadline, "the upstream stream was not cancelled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn http_body_is_raw_in_and_out_and_response_body_selects_a_field() {
    for edge in Edge::both().await {
        let resp = edge.req("GET", "/v1/download/f.txt").send().await.unwrap();
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(resp.text().await.unwrap(), "hello f.txt");

        let resp = edge
            .req("POST", "/v1/upload")
            .header("content-type", "image/png")
            .body(vec![0u8, 1, 2, 3, 255])
            .send()
            .await
            .unwrap();
        let b: Value = resp.json().await.unwrap();
        assert_eq!(b, json!({"contentType": "image/png", "size": "5"}));

        let (_, b) = edge.json("GET", "/v1/notes/n1?note.text=hello", None).await;
        assert_eq!(b, json!({"text": "hello", "tags": []}));
    }
}

#[tokio::test]
async fn openapi_is_generated_from_the_descriptors_and_docs_are_served() {
    let edge = Edge::start(false, GatewayOptions::default()).await;
    let (s, doc) = edge.json("GET", "/openapi.json", None).await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let get = &doc["paths"]["/v1/echo/{id}"]["get"];
    assert_eq!(get["operationId"], "EchoService_Echo");
    assert_eq!(get["summary"], "Returns the request unchanged");
    assert!(get["description"].as_str().unwrap().contains("Public"));
    assert_eq!(get["security"], json!([]));
    let params = get["parameters"].as_array().unwrap();
    assert!(
        params
            .iter()
            .any(|p| p["name"] == "id" && p["in"] == "path" && p["required"] == true)
    );
    assert!(params.iter().any(|p| p["name"] == "nested.b" && p["in"] == "query"));
    assert_eq!(
        get["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/google.rpc.Status"
    );
    let update = &doc["paths"]["/v1/echo/{message_id}"]["patch"];
    assert!(update["description"].as_str().unwrap().contains("denied to everyone"));
    assert_eq!(
        doc["paths"]["/v1/echo"]["post"]["operationId"], "EchoService_Echo3",
        "additional bindings get numbered operation ids"
    );
    assert!(doc["paths"]["/plinth.gatewaytest.v1.EchoService/Unbound"]["post"].is_object());
    assert!(doc["paths"]["/plinth.gatewaytest.v1.EchoService/Echo"].is_null());
    let message = &doc["components"]["schemas"]["plinth.gatewaytest.v1.EchoMessage"];
    assert!(
        message["description"]
            .as_str()
            .unwrap()
            .starts_with("The message echoed back")
    );
    assert_eq!(message["properties"]["count"]["type"], "string");
    assert_eq!(
        doc["components"]["schemas"]["plinth.gatewaytest.v1.FailRequest"]["required"],
        json!(["code"]),
        "google.api.field_behavior REQUIRED becomes required"
    );
    assert_eq!(doc["components"]["securitySchemes"]["bearerAuth"]["scheme"], "bearer");
    let stream = &doc["paths"]["/v1/stream"]["get"]["responses"]["200"]["content"]["application/x-ndjson"];
    assert!(stream["schema"]["properties"]["result"].is_object());

    // An upstream without grpc.health.v1 answers 501, as grpc-gateway maps it.
    let (s, b) = edge
        .json("GET", "/healthz?service=plinth.gatewaytest.v1.EchoService", None)
        .await;
    assert_eq!((s, b["code"].clone()), (StatusCode::NOT_IMPLEMENTED, json!(12)), "{b}");

    let resp = edge.req("GET", "/docs").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("/openapi.json"));
}

#[tokio::test]
async fn edge_duties_cors_security_headers_compression_and_metrics() {
    let options = GatewayOptions {
        cors_origins: vec!["https://app.example".into()],
        ..GatewayOptions::default()
    };
    let edge = Edge::start(false, options).await;
    let resp = edge
        .req("OPTIONS", "/v1/echo/x")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example");
    let resp = edge
        .req("GET", "/v1/echo/x")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");

    let resp = edge
        .req("GET", "/openapi.json")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let resp = edge
        .req("GET", "/v1/stream?count=50")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(
        !resp.headers().contains_key("content-encoding"),
        "streams are never compressed"
    );

    let metrics = plinth_runtime::metrics::render();
    assert!(
        metrics.contains(r#"plinth_gateway_requests_total{method="GET",route="GET /v1/echo/{id}",status="200"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn clients_over_their_rate_get_429_with_retry_after() {
    let options = GatewayOptions {
        rate_limit: Some(RateLimiter::new(Arc::new(InProcessState::new()), "gw-test", 0.5, 2.0)),
        ..GatewayOptions::default()
    };
    let edge = Edge::start(false, options).await;
    for _ in 0..2 {
        assert_eq!(edge.req("GET", "/v1/echo/x").send().await.unwrap().status(), 200);
    }
    let resp = edge.req("GET", "/v1/echo/x").send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["code"], 8);

    // Behind a trusted proxy, each forwarded client has its own bucket.
    let options = GatewayOptions {
        rate_limit: Some(RateLimiter::new(
            Arc::new(InProcessState::new()),
            "gw-test-proxied",
            0.5,
            2.0,
        )),
        trusted_proxies: plinth_runtime::client_address::TrustedProxies::parse("127.0.0.1").unwrap(),
        ..GatewayOptions::default()
    };
    let edge = Edge::start(false, options).await;
    let from = |client: &str| {
        edge.req("GET", "/v1/echo/x")
            .header("x-forwarded-for", client.to_owned())
    };
    for _ in 0..2 {
        assert_eq!(from("10.0.0.1").send().await.unwrap().status(), 200);
    }
    assert_eq!(from("10.0.0.1").send().await.unwrap().status(), 429);
    assert_eq!(
        from("10.0.0.2").send().await.unwrap().status(),
        200,
        "another client behind the proxy"
    );
}
