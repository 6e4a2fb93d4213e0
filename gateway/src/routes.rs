//! The route table, compiled once from the descriptor set: every
//! `google.api.http` rule (with its additional bindings) plus the implicit
//! `POST /<package.Service>/<Method>` binding of every RPC. A rule that names
//! a field the message does not have fails start-up, not the first request.

use std::sync::Arc;

use http::Method;
use plinth::google::api::HttpRule;
use plinth::google::api::http_rule::Pattern;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, Value};

use crate::template::{Capture, PathTemplate, TemplateError};

/// The full name of `google.api.HttpBody`, which is carried raw.
pub const HTTP_BODY: &str = "google.api.HttpBody";
/// The full name of `google.protobuf.FieldMask`.
pub const FIELD_MASK: &str = "google.protobuf.FieldMask";

/// The route table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The descriptor set does not decode.
    #[error("descriptor set: {0}")]
    Descriptors(String),
    /// A template does not parse.
    #[error("{rpc}: {source}")]
    Template {
        /// The RPC.
        rpc: String,
        /// Why.
        source: TemplateError,
    },
    /// A rule names a field that does not fit.
    #[error("{rpc}: {reason}")]
    Field {
        /// The RPC.
        rpc: String,
        /// Why.
        reason: String,
    },
}

/// One RPC, as the gateway calls it.
#[derive(Debug)]
pub struct Rpc {
    /// The method.
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: http::uri::PathAndQuery,
    /// The service's full name.
    pub service: String,
    /// The permission the contract declares, if any.
    pub permission: Option<String>,
}

impl Rpc {
    /// The input message.
    pub fn input(&self) -> MessageDescriptor {
        self.method.input()
    }

    /// The output message.
    pub fn output(&self) -> MessageDescriptor {
        self.method.output()
    }

    /// `Service_Method`, the OpenAPI operation id.
    pub fn operation_id(&self) -> String {
        format!("{}_{}", self.method.parent_service().name(), self.method.name())
    }
}

/// Where the request body goes.
#[derive(Debug, Clone)]
pub enum BodyTarget {
    /// No body.
    None,
    /// `body: "*"`: the whole message (no query parameters).
    Whole,
    /// `body: "field"`: one top-level field.
    Field(FieldDescriptor),
}

/// Which method a binding answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodMatch {
    /// One HTTP method.
    Exact(Method),
    /// `custom { kind: "*" }`.
    Any,
}

impl MethodMatch {
    fn accepts(&self, m: &Method) -> bool {
        match self {
            Self::Exact(x) => x == m,
            Self::Any => true,
        }
    }

    /// The method's name for documents and logs (`*` for any).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(m) => m.as_str(),
            Self::Any => "*",
        }
    }
}

/// One HTTP binding of one RPC.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The method it answers.
    pub method: MethodMatch,
    /// The path template.
    pub template: PathTemplate,
    /// Where the body goes.
    pub body: BodyTarget,
    /// `response_body`: only this field of the response is sent.
    pub response_body: Option<FieldDescriptor>,
    /// For PATCH with a field body and one `FieldMask` field: that field,
    /// filled from the body's JSON keys when the client sends none.
    pub patch_mask: Option<FieldDescriptor>,
    /// The RPC.
    pub rpc: Arc<Rpc>,
    /// Whether this is the implicit `POST /pkg.Svc/Method` binding.
    pub implicit: bool,
    /// `METHOD /template`, the label of its logs and metrics (built once).
    pub label: Arc<str>,
}

fn label(method: &MethodMatch, template: &PathTemplate) -> Arc<str> {
    format!("{} {}", method.as_str(), template.as_str()).into()
}

/// The outcome of looking a request up.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// A binding, with its captured variables.
    Found(&'a Binding, Vec<Capture>),
    /// The path exists but not for this method; the methods it has.
    WrongMethod(Vec<String>),
    /// No binding has this path.
    NotFound,
}

/// Every binding, in registration order (the last match wins, as in grpc-gateway v2).
#[derive(Debug)]
pub struct RouteTable {
    bindings: Vec<Binding>,
    pool: DescriptorPool,
}

impl RouteTable {
    /// Builds the table from an encoded `FileDescriptorSet`.
    pub fn from_descriptor_set(descriptor_set: &[u8]) -> Result<Self, RouteError> {
        let pool = DescriptorPool::decode(descriptor_set).map_err(|e| RouteError::Descriptors(e.to_string()))?;
        Self::from_pool(pool)
    }

    /// Builds the table from a descriptor pool.
    pub fn from_pool(pool: DescriptorPool) -> Result<Self, RouteError> {
        let http_ext = pool.get_extension_by_name("google.api.http");
        let permission_ext = pool.get_extension_by_name(plinth::common::v1::PERMISSION_OPTION);
        let mut bindings = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                if method.is_client_streaming() {
                    // Client and bidirectional streams have no HTTP/1.1 mapping here.
                    continue;
                }
                let options = method.options();
                let permission = permission_ext.as_ref().and_then(|ext| {
                    options
                        .has_extension(ext)
                        .then(|| options.get_extension(ext))
                        .and_then(|v| v.as_str().map(str::to_owned))
                });
                let rpc = Arc::new(Rpc {
                    grpc_path: format!("/{}/{}", service.full_name(), method.name()).parse().map_err(
                        |e: http::uri::InvalidUri| RouteError::Field {
                            rpc: method.full_name().to_owned(),
                            reason: e.to_string(),
                        },
                    )?,
                    service: service.full_name().to_owned(),
                    permission,
                    method: method.clone(),
                });
                if let Some(ext) = &http_ext
                    && options.has_extension(ext)
                    && let Value::Message(m) = options.get_extension(ext).as_ref()
                {
                    let rule: HttpRule = m.transcode_to().map_err(|e| RouteError::Field {
                        rpc: method.full_name().to_owned(),
                        reason: format!("google.api.http does not decode: {e}"),
                    })?;
                    bindings.push(binding(&rpc, &rule)?);
                    for extra in &rule.additional_bindings {
                        bindings.push(binding(&rpc, extra)?);
                    }
                }
                let template = PathTemplate::parse(rpc.grpc_path.path()).map_err(|source| RouteError::Template {
                    rpc: method.full_name().to_owned(),
                    source,
                })?;
                bindings.push(Binding {
                    label: label(&MethodMatch::Exact(Method::POST), &template),
                    method: MethodMatch::Exact(Method::POST),
                    template,
                    body: BodyTarget::Whole,
                    response_body: None,
                    patch_mask: None,
                    rpc,
                    implicit: true,
                });
            }
        }
        Ok(Self { bindings, pool })
    }

    /// The descriptor pool the table was built from.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// Every binding in registration order.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Finds the binding for `method` and the raw `path` (last match wins).
    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut allowed: Vec<String> = Vec::new();
        for b in self.bindings.iter().rev() {
            let Some(captures) = b.template.matches(path) else {
                continue;
            };
            if b.method.accepts(method) {
                return Lookup::Found(b, captures);
            }
            let name = b.method.as_str().to_owned();
            if !allowed.contains(&name) {
                allowed.push(name);
            }
        }
        if allowed.is_empty() {
            Lookup::NotFound
        } else {
            Lookup::WrongMethod(allowed)
        }
    }
}

fn binding(rpc: &Arc<Rpc>, rule: &HttpRule) -> Result<Binding, RouteError> {
    let name = rpc.method.full_name().to_owned();
    let field_err = |reason: String| RouteError::Field {
        rpc: name.clone(),
        reason,
    };
    let (method, path) = match &rule.pattern {
        Some(Pattern::Get(p)) => (MethodMatch::Exact(Method::GET), p),
        Some(Pattern::Put(p)) => (MethodMatch::Exact(Method::PUT), p),
        Some(Pattern::Post(p)) => (MethodMatch::Exact(Method::POST), p),
        Some(Pattern::Delete(p)) => (MethodMatch::Exact(Method::DELETE), p),
        Some(Pattern::Patch(p)) => (MethodMatch::Exact(Method::PATCH), p),
        Some(Pattern::Custom(c)) if c.kind == "*" => (MethodMatch::Any, &c.path),
        Some(Pattern::Custom(c)) => (
            MethodMatch::Exact(
                Method::from_bytes(c.kind.as_bytes())
                    .map_err(|e| field_err(format!("custom kind {:?}: {e}", c.kind)))?,
            ),
            &c.path,
        ),
        None => return Err(field_err("google.api.http has no pattern".into())),
    };
    let template = PathTemplate::parse(path).map_err(|source| RouteError::Template {
        rpc: name.clone(),
        source,
    })?;
    let input = rpc.input();
    for v in template.variables() {
        let field = resolve_path(&input, &v.field_path).map_err(&field_err)?;
        if field.is_list() || field.is_map() || matches!(field.kind(), Kind::Message(_)) {
            return Err(field_err(format!(
                "path variable {} must be a singular scalar field",
                v.field_path.join(".")
            )));
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyTarget::None,
        "*" => BodyTarget::Whole,
        field => BodyTarget::Field(input.get_field_by_name(field).ok_or_else(|| {
            field_err(format!(
                "body field {field:?} is not a top-level field of {}",
                input.full_name()
            ))
        })?),
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        field => Some(rpc.output().get_field_by_name(field).ok_or_else(|| {
            field_err(format!(
                "response_body field {field:?} is not a top-level field of {}",
                rpc.output().full_name()
            ))
        })?),
    };
    let patch_mask = match (&method, &body) {
        (MethodMatch::Exact(m), BodyTarget::Field(_)) if *m == Method::PATCH => {
            let masks: Vec<FieldDescriptor> = input
                .fields()
                .filter(|f| !f.is_list() && matches!(f.kind(), Kind::Message(m) if m.full_name() == FIELD_MASK))
                .collect();
            if masks.len() == 1 {
                masks.into_iter().next()
            } else {
                None
            }
        }
        _ => None,
    };
    Ok(Binding {
        label: label(&method, &template),
        method,
        template,
        body,
        response_body,
        patch_mask,
        rpc: rpc.clone(),
        implicit: false,
    })
}

/// Resolves a dotted path of proto field names through singular messages.
pub fn resolve_path(message: &MessageDescriptor, path: &[String]) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut field = None;
    for (i, part) in path.iter().enumerate() {
        let f = current
            .get_field_by_name(part)
            .ok_or_else(|| format!("{} has no field {part:?}", current.full_name()))?;
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() => current = m,
                _ => return Err(format!("{part:?} in {} is not a singular message", path.join("."))),
            }
        }
        field = Some(f);
    }
    field.ok_or_else(|| "empty field path".to_owned())
}
