//! Embedding calls that arrive together are sent together: concurrent
//! `Embed` calls for the same provider model (and the same dimensions and
//! end user) within a short window become one upstream request, and each
//! caller gets its own vectors back, in its own order, with its share of
//! the usage. Providers price embeddings per token, so batching costs
//! nothing and saves a round trip and a rate-limit slot per call.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plinth_runtime::Tasks;
use tokio::sync::oneshot;

use crate::model::{EmbedRequest, EmbedResponse, Usage};
use crate::providers::ProviderError;
use crate::router::Target;

/// Most inputs in one upstream request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

type Key = (String, Option<u32>, Option<String>);
type Reply = oneshot::Sender<Result<EmbedResponse, ProviderError>>;

struct Batch {
    inputs: Vec<String>,
    waiters: Vec<(Range<usize>, Reply)>,
}

/// The batches being gathered, one per key.
#[derive(Clone)]
pub struct Coalescer {
    window: Duration,
    tasks: Tasks,
    open: Arc<Mutex<HashMap<Key, Batch>>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Coalescer {
    /// Gathers for `window` (zero: every call goes alone).
    pub fn new(window: Duration, tasks: Tasks) -> Self {
        Self {
            window,
            tasks,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Embeds `request` on `target`, together with whatever else arrives
    /// for it within the window. The batch is sent by a task of its own, so
    /// a caller that goes away does not strand the others.
    pub async fn embed(&self, target: Arc<Target>, request: EmbedRequest) -> Result<EmbedResponse, ProviderError> {
        if self.window.is_zero() || request.inputs.len() >= MAX_INPUTS {
            return target.adapter.embed(&request).await;
        }
        let key: Key = (target.label(), request.dimensions, request.user.clone());
        let (tx, rx) = oneshot::channel();
        // Joined an open batch, opened one, or found it full (go alone).
        let (opened, full) = {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            match open.get_mut(&key) {
                Some(batch) if batch.inputs.len() + request.inputs.len() <= MAX_INPUTS => {
                    let start = batch.inputs.len();
                    batch.inputs.extend(request.inputs.iter().cloned());
                    batch.waiters.push((start..batch.inputs.len(), tx));
                    (false, None)
                }
                Some(_) => (false, Some(tx)),
                None => {
                    let n = request.inputs.len();
                    open.insert(
                        key.clone(),
                        Batch {
                            inputs: request.inputs.clone(),
                            waiters: vec![(0..n, tx)],
                        },
                    );
                    (true, None)
                }
            }
        };
        if full.is_some() {
            return target.adapter.embed(&request).await;
        }
        if opened {
            let (window, open) = (self.window, self.open.clone());
            let template = request.clone();
            self.tasks.spawn("ai-embed-batch", async move {
                tokio::time::sleep(window).await;
                let batch = open.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
                if let Some(batch) = batch {
                    send(&target, template, batch).await;
                }
                Ok::<(), std::convert::Infallible>(())
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(ProviderError::Connect("the embedding batch was dropped".into())))
    }
}

/// Sends one batch and hands each caller its slice.
async fn send(target: &Target, template: EmbedRequest, batch: Batch) {
    let request = EmbedRequest {
        inputs: batch.inputs,
        ..template
    };
    let result = target.adapter.embed(&request).await;
    let total_chars: usize = request.inputs.iter().map(String::len).sum::<usize>().max(1);
    for (i, (range, reply)) in batch.waiters.into_iter().enumerate() {
        let part = match &result {
            Err(e) => Err(e.clone()),
            Ok(all) => match all.vectors.get(range.clone()) {
                None => Err(ProviderError::Malformed("fewer embeddings than inputs".into())),
                Some(vectors) => {
                    let chars: usize = request.inputs[range.clone()].iter().map(String::len).sum();
                    let share = |n: u64| (n as f64 * chars as f64 / total_chars as f64).round() as u64;
                    Ok(EmbedResponse {
                        model: all.model.clone(),
                        vectors: vectors.to_vec(),
                        usage: Usage {
                            input_tokens: share(all.usage.input_tokens),
                            ..Usage::default()
                        },
                    })
                }
            },
        };
        // One upstream failure counts once against the target's breaker:
        // the first caller reports it, the others only give their slot back.
        let part = match part {
            Err(e) if i > 0 => Err(ProviderError::Shared(Box::new(e))),
            other => other,
        };
        let _ = reply.send(part);
    }
}
