//! The README's tour, executed exactly as written so that it cannot rot.
//! Every ```` ```sh ```` block between `## Tour` and the next section runs, in
//! order, in one bash session with `set -euo pipefail`, against a `plinthd`
//! on the addresses the tour names (`localhost:8080`, `localhost:50051`)
//! with the embedded defaults. A block the README marks
//! `<!-- tour: skip … -->` (starting the server, installing packages) is
//! left out, with its reason in the marker.
//!
//! `curl` and `grpcurl` run through thin shell functions that only watch:
//! a `curl` must get a 2xx unless its line's comment starts with the status
//! the tour says it gets (`# 409 …`); a streaming `curl -N` or `grpcurl`
//! stream is cut after a few seconds, which counts as success once it has
//! answered. The AI provider the tour configures is a local fake.

use std::path::Path;

use plinth_tests::fake_upstream::{FakeUpstream, Reply, sse_frames};
use plinth_tests::mesh::{Mesh, Shape};
use plinth_tests::{ADMIN_PASSWORD, plinthd_binary};
use serde_json::json;

/// The shell functions every tour script starts with (see the module docs).
const PRELUDE: &str = r#"
set -euo pipefail
trap 'echo "tour: failed at README.md line ${TOUR_LINE:-?}: $BASH_COMMAND" >&2' ERR
curl() {
  local streaming=0 code rc=0 want="${PLINTH_TOUR_EXPECT:-2xx}"
  for a in "$@"; do case "$a" in -N|-sN|-Ns|-siN) streaming=1;; esac; done
  if [ "$streaming" = 1 ]; then set -- --max-time 3 "$@"; fi
  { code=$(command curl -w '%{stderr}%{http_code}' "$@" 2>&1 >&3) || rc=$?; } 3>&1
  code="${code: -3}"
  if [ "$rc" != 0 ] && ! { [ "$streaming" = 1 ] && [ "$rc" = 28 ] && [ "$code" = 200 ]; }; then
    echo "tour: curl $* failed (exit $rc, HTTP $code)" >&2; return 1
  fi
  case "$want" in
    2xx) [ "${code:0:1}" = 2 ] || { echo "tour: curl $* answered HTTP $code" >&2; return 1; } ;;
    *) [ "$code" = "$want" ] || { echo "tour: curl $* answered HTTP $code, the tour says $want" >&2; return 1; } ;;
  esac
}
grpcurl() {
  case "$*" in
    */Subscribe|*/Watch|*/StreamEvents)
      local rc=0; timeout 4 grpcurl-bin "$@" || rc=$?
      [ "$rc" = 0 ] || [ "$rc" = 124 ] || { echo "tour: grpcurl $* failed (exit $rc)" >&2; return 1; } ;;
    *) grpcurl-bin "$@" ;;
  esac
}
"#;

/// The tour's shell blocks with the README line each starts on.
fn tour_blocks(readme: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut in_tour = false;
    let mut current: Option<(usize, String)> = None;
    let mut skip = false;
    let mut previous = "";
    for (i, line) in readme.lines().enumerate() {
        if line.starts_with("## ") {
            in_tour = line == "## Tour";
        }
        if !in_tour {
            continue;
        }
        if let Some((start, body)) = current.as_mut() {
            if line.starts_with("```") {
                if !skip {
                    blocks.push((*start, std::mem::take(body)));
                }
                current = None;
            } else {
                body.push_str(line);
                body.push('\n');
            }
        } else if line == "```sh" {
            skip = previous.starts_with("<!-- tour: skip");
            current = Some((i + 2, String::new()));
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    blocks
}

/// `block` with each `curl` command told the status its comment promises,
/// and each command's README line recorded for the failure message.
fn instrument(start: usize, block: &str) -> String {
    let mut out = String::new();
    let mut continued = false;
    let lines: Vec<&str> = block.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !continued {
            // The comment that matters is on the command's last line.
            let mut last = i;
            while lines[last].trim_end().ends_with('\\') && last + 1 < lines.len() {
                last += 1;
            }
            let expect = lines[last]
                .split_once(" # ")
                .map(|(_, comment)| comment.trim_start())
                .filter(|c| c.len() >= 3 && c.as_bytes()[..3].iter().all(u8::is_ascii_digit))
                .map(|c| &c[..3]);
            out.push_str(&format!("TOUR_LINE={}\n", start + i));
            if let (Some(code), true) = (expect, line.starts_with("curl ")) {
                out.push_str(&format!("PLINTH_TOUR_EXPECT={code} "));
            }
        }
        out.push_str(line);
        out.push('\n');
        continued = line.trim_end().ends_with('\\');
    }
    out
}

#[tokio::test]
async fn the_readme_tour_runs_as_written() {
    let Ok(python) = std::env::var("PLINTH_TEST_PYTHON") else {
        assert!(
            std::env::var_os("PLINTH_TEST_REQUIRE_BACKENDS").is_none(),
            "PLINTH_TEST_PYTHON must name the tools venv (grpcurl lives beside it)"
        );
        eprintln!("skipped: PLINTH_TEST_PYTHON is not set (grpcurl lives beside it)");
        return;
    };
    let venv_bin = Path::new(&python).parent().unwrap().to_owned();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let blocks = tour_blocks(&readme);
    assert!(blocks.len() >= 10, "the tour has its shell blocks: {}", blocks.len());

    // The tour's AI section: `chat` on an OpenAI-shaped provider, here a fake
    // that answers once plainly and once streaming.
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        "/v1/chat/completions",
        Reply::ok(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        })),
    );
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut frames = sse_frames([
        ("", chunk(json!({"role": "assistant", "content": "1, 2"}), json!(null))),
        ("", chunk(json!({"content": ", 3"}), json!("stop"))),
        (
            "",
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini", "choices": [],
                   "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}),
        ),
    ]);
    frames.push("data: [DONE]\n\n".into());
    fake.push("/v1/chat/completions", Reply::sse(frames));
    let toml = format!(
        "[ai.providers.openai]\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"sk-tour\"\n\
         [[ai.models]]\nname = \"chat\"\ntargets = [{{ provider = \"openai\", model = \"gpt-4o-mini\" }}]\n\
         [[ai.prices]]\nmodel = \"gpt-4o-mini\"\ninput = 0.15\noutput = 0.60\n",
        fake.url()
    );
    let args = ["--grpc-listen", "127.0.0.1:50051", "--http-listen", "127.0.0.1:8080"].map(String::from);
    let mesh = Mesh::start_with_args(plinthd_binary!(), Shape::Embedded, "readme_tour", &toml, &args)
        .await
        .unwrap()
        .unwrap();

    // `plinthd` and `grpcurl` as the tour names them; the real grpcurl
    // stays reachable for the watching function.
    let bin = mesh.dir().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(plinthd_binary!(), bin.join("plinthd")).unwrap();
    std::os::unix::fs::symlink(venv_bin.join("grpcurl"), bin.join("grpcurl-bin")).unwrap();
    let work = mesh.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut script = PRELUDE.to_owned();
    for (start, block) in &blocks {
        script.push_str(&instrument(*start, block));
    }
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(work)
            .env("PATH", path)
            .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env_remove("PLINTH_TOUR_EXPECT")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the README tour failed:\n--- stderr ---\n{stderr}\n--- stdout (last 60 lines) ---\n{}",
        stdout
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // What the tour's comments promise, seen in what it printed.
    for promised in [
        "\"status\":\"SERVING\"",
        "\"allowed\":true",
        "\"outcomes\":[\"ACK_OUTCOME_ACKED\"]",
        "\"ok\":true",
        "Hi!",
        "data: [DONE]",
        "\"openapi\"",
        "PLINTH_GRPC_LISTEN",
    ] {
        assert!(stdout.contains(promised), "the tour printed no {promised}:\n{stdout}");
    }
    mesh.stop().await;
}
