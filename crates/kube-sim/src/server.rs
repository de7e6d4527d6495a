//! The HTTPS front end: authentication, routing of Kubernetes REST paths, watches as chunked
//! newline-delimited JSON, Table output, discovery, OpenAPI, and the `/_sim/` admin and fault API.

use std::{borrow::Cow, collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::{
    api::{self, DeleteOptions, FieldValidation, ListOptions, Part, PatchKind, WriteOptions},
    component_status, discovery,
    error::ApiError,
    events, kinds, scale,
    selector::{FieldSelector, LabelSelector},
    store::{ObjectKey, Resource, ResourceKey, Store},
    table, tokens,
};

/// The body type of every response.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Faults injected into every request whose path starts with `path_prefix`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Added latency in milliseconds.
    pub latency_ms: u64,
    /// Fraction (0..=1) of requests answered with `error_code`.
    pub error_rate: f64,
    /// 429, 500 or 503.
    pub error_code: u16,
    /// `Retry-After` seconds sent with 429.
    pub retry_after_seconds: u64,
    /// Only paths with this prefix are affected (all when empty).
    pub path_prefix: String,
}

/// State shared by every connection of one server.
pub struct Shared {
    /// The objects.
    pub store: Mutex<Store>,
    /// The bearer token clients must present.
    pub token: String,
    /// Active faults.
    pub faults: Mutex<Faults>,
    /// Closes every open watch when sent to.
    pub close_watches: broadcast::Sender<()>,
    /// ServiceAccount tokens issued through TokenRequests.
    pub tokens: tokens::Tokens,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut res = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *res.status_mut() = code;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn error_response(err: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = json_response(code, &err.to_status());
    if let Some(seconds) = err.retry_after
        && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
    {
        res.headers_mut().insert(header::RETRY_AFTER, value);
    }
    res
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(key)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Handles one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    client: Option<Arc<Value>>,
) -> Result<Response<Body>, Infallible> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    // The server's own token is the admin (`None`); a ServiceAccount token is its account.
    // A trusted client certificate is tried first, as the real server does; its user is
    // recorded as it is (`kubernetes-admin` in `system:masters` for the admin certificate).
    let user = match bearer {
        _ if client.is_some() => Some(client.as_deref().cloned()),
        Some(token) if token == shared.token => Some(None),
        Some(token) => shared
            .tokens
            .authenticate(&shared.store.lock(), &shared.token, &token, &[])
            .ok()
            .map(|(user, _)| Some(user)),
        None => None,
    };
    let Some(user) = user else {
        return Ok(error_response(&ApiError::new(
            401,
            "Unauthorized",
            "Unauthorized",
        )));
    };
    let path = req.uri().path().to_owned();
    let is_admin = user.as_ref().is_none_or(|u| {
        u["groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g == "system:masters"))
    });
    if let Some(admin) = path.strip_prefix("/_sim/")
        && is_admin
    {
        return Ok(admin_request(&shared, admin, req).await);
    }
    let faults = shared.faults.lock().clone();
    if faults.path_prefix.is_empty() || path.starts_with(&faults.path_prefix) {
        if faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
        }
        if faults.error_rate > 0.0 && rand::random::<f64>() < faults.error_rate {
            let code = if faults.error_code == 0 {
                503
            } else {
                faults.error_code
            };
            let reason = match code {
                429 => "TooManyRequests",
                503 => "ServiceUnavailable",
                _ => "InternalError",
            };
            let mut err = ApiError::new(code, reason, format!("injected fault: {code}"));
            if code == 429 {
                err.retry_after = Some(faults.retry_after_seconds.max(1));
            }
            return Ok(error_response(&err));
        }
    }
    Ok(match route(&shared, req, user).await {
        Ok(res) => res,
        Err(err) => error_response(&err),
    })
}

async fn admin_request(shared: &Shared, path: &str, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match (method, path) {
        (Method::GET, "healthz") => json_response(
            StatusCode::OK,
            &json!({"ok": true, "resourceVersion": shared.store.lock().rv().to_string()}),
        ),
        (Method::POST, "faults") => match serde_json::from_slice::<Faults>(&body) {
            Ok(faults) => {
                *shared.faults.lock() = faults.clone();
                json_response(
                    StatusCode::OK,
                    &serde_json::to_value(faults).unwrap_or_default(),
                )
            }
            Err(err) => error_response(&ApiError::bad_request(format!("invalid faults: {err}"))),
        },
        (Method::DELETE, "faults") => {
            *shared.faults.lock() = Faults::default();
            json_response(StatusCode::OK, &json!({}))
        }
        (Method::POST, "close-watches") => {
            let n = shared.close_watches.send(()).unwrap_or(0);
            json_response(StatusCode::OK, &json!({"closed": n}))
        }
        (Method::POST, "compact") => {
            let mut store = shared.store.lock();
            if let Err(err) = store.compact() {
                return error_response(&err);
            }
            json_response(
                StatusCode::OK,
                &json!({"compactedResourceVersion": store.compacted_rv().to_string()}),
            )
        }
        _ => error_response(&ApiError::not_found("_sim", path)),
    }
}

/// What a REST path addresses.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(store: &Store, segments: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match segments {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let lookup = |plural: &str| {
        store
            .resource(group, version, plural)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
            })
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if store
                .resource(group, version, plural)
                .is_some_and(|r| r.namespaced) =>
        {
            (Some((*ns).to_owned()), [&[*plural][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let target =
        |plural: &str, name: Option<&str>, sub: Option<&str>| -> Result<Target, ApiError> {
            let resource = lookup(plural)?;
            if resource.namespaced && namespace.is_none() && name.is_some() {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
            Ok(Target {
                resource,
                namespace: namespace.clone(),
                name: name.map(str::to_owned),
                subresource: sub.map(str::to_owned),
            })
        };
    match rest.as_slice() {
        [plural] => target(plural, None, None),
        [plural, name] => target(plural, Some(name), None),
        [plural, name, sub] => target(plural, Some(name), Some(sub)),
        _ => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// A response plus the warnings to send with it.
fn with_warnings(mut res: Response<Body>, warnings: &[String]) -> Response<Body> {
    for warning in warnings {
        let text = format!("299 - {}", serde_json::Value::String(warning.clone()));
        if let Ok(value) = HeaderValue::from_str(&text) {
            res.headers_mut().append(header::WARNING, value);
        }
    }
    res
}

fn write_options(
    query: &HashMap<String, String>,
    user_agent: &str,
) -> Result<WriteOptions, ApiError> {
    let explicit = query.get("fieldManager").filter(|m| !m.is_empty());
    let manager = match explicit {
        Some(manager) => manager.clone(),
        None => user_agent
            .split('/')
            .next()
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    };
    Ok(WriteOptions {
        manager,
        manager_explicit: explicit.is_some(),
        field_validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str))?,
        dry_run: is_dry_run(query)?,
        force: query.get("force").is_some_and(|f| f == "true"),
        warnings: Vec::new(),
        user: None,
        events_api: false,
    })
}

fn is_dry_run(query: &HashMap<String, String>) -> Result<bool, ApiError> {
    match query.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "dryRun: Unsupported value: {other:?}: supported values: \"All\""
        ))),
    }
}

fn list_options(
    query: &HashMap<String, String>,
    resource: &Resource,
) -> Result<ListOptions, ApiError> {
    Ok(ListOptions {
        labels: LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))?,
        fields: FieldSelector::parse_for(
            query.get("fieldSelector").map(String::as_str).unwrap_or(""),
            &resource.group,
            &resource.plural,
        )?,
        limit: query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0),
        continue_from: match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => Some(api::decode_continue(token, &resource.key())?),
            None => None,
        },
    })
}

fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// `Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`: metadata only.
fn wants_metadata(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

/// An object as `PartialObjectMetadata`: its metadata alone (kube-rs's metadata watchers, and
/// `kubectl get` of kinds it has no table for, ask for this).
fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"].clone(),
    })
}

/// How objects are sent: whole, as Table rows (`includeObject`), or metadata only.
#[derive(Clone, Debug)]
enum Representation {
    Object,
    Table(String),
    Metadata,
}

impl Representation {
    fn of(accept: &str, include_object: &str) -> Representation {
        if wants_table(accept) {
            Representation::Table(include_object.to_owned())
        } else if wants_metadata(accept) {
            Representation::Metadata
        } else {
            Representation::Object
        }
    }
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    user: Option<Value>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let query = query_map(req.uri().query());
    let method = req.method().clone();
    let header_text = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let accept = header_text(header::ACCEPT);
    let content_type = header_text(header::CONTENT_TYPE);
    let user_agent = header_text(header::USER_AGENT);

    // Discovery, version, health and OpenAPI.
    if method == Method::GET {
        let store = shared.store.lock();
        let aggregated = discovery::wants_aggregated(&accept);
        let doc = match segments.as_slice() {
            ["version"] => Some(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-sim", "gitCommit": "kube-sim", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
            ),
            ["healthz"] | ["readyz"] | ["livez"] => return Ok(Response::new(full("ok"))),
            ["api"] if aggregated => {
                return Ok(aggregated_response(&discovery::aggregated(&store, true)));
            }
            ["apis"] if aggregated => {
                return Ok(aggregated_response(&discovery::aggregated(&store, false)));
            }
            ["api"] => Some(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            ),
            ["api", version] => Some(
                discovery::resource_list(&store, "", version)
                    .ok_or_else(|| ApiError::not_found("groupversions", version))?,
            ),
            ["apis"] => Some(discovery::group_list(&store)),
            ["apis", group] => {
                let versions = discovery::group_versions(&store, group)
                    .filter(|_| !group.is_empty())
                    .ok_or_else(|| ApiError::not_found("groups", group))?;
                Some(discovery::group_doc(group, &versions))
            }
            ["apis", group, version] => Some(
                discovery::resource_list(&store, group, version)
                    .ok_or_else(|| ApiError::not_found("groupversions", version))?,
            ),
            ["openapi", "v3"] => Some(discovery::openapi_index(&store)),
            ["openapi", "v3", "api", version] => Some(
                discovery::openapi_group_version(&store, "", version)
                    .ok_or_else(|| ApiError::not_found("openapi", version))?,
            ),
            ["openapi", "v3", "apis", group, version] => Some(
                discovery::openapi_group_version(&store, group, version)
                    .ok_or_else(|| ApiError::not_found("openapi", version))?,
            ),
            ["openapi", "v2"] => {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
            _ => None,
        };
        if let Some(doc) = doc {
            return Ok(json_response(StatusCode::OK, &doc));
        }
    }

    let target = {
        let store = shared.store.lock();
        parse_target(&store, &segments)?
    };
    let resource = target.resource.clone();
    let namespace = target.namespace.clone().unwrap_or_default();
    let part = match target.subresource.as_deref() {
        None => Part::Main,
        Some("status") if resource.status_subresource => Part::Status,
        Some("approval") if kinds::is_csr(&resource) => Part::Approval,
        Some("ephemeralcontainers") if kinds::is_pod(&resource) => Part::EphemeralContainers,
        Some("scale") if resource.scale.is_some() => {
            let name = target.name.clone().unwrap_or_default();
            let mut options = write_options(&query, &user_agent)?;
            options.user = user;
            return scale_request(
                shared,
                req,
                &resource,
                &namespace,
                &name,
                &content_type,
                options,
            )
            .await;
        }
        Some("token") if resource.group.is_empty() && resource.plural == "serviceaccounts" => {
            let name = target.name.clone().unwrap_or_default();
            if method != Method::POST {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ));
            }
            let body = read_body(req).await?;
            let request = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                parse_object(&body, &content_type)?
            };
            let answer = shared
                .tokens
                .issue(&shared.store.lock(), &namespace, &name, &request)?;
            return Ok(json_response(StatusCode::CREATED, &answer));
        }
        Some(_) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    if resource.read_only {
        return component_statuses(&method, target.name.as_deref(), &query, &accept).await;
    }
    if resource.create_only {
        if method != Method::POST || target.name.is_some() {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!(
                    "the server does not allow this method on the requested resource ({method})"
                ),
            ));
        }
        let body = read_body(req).await?;
        // kubectl sends reviews as protobuf, whose spec kube-sim does not decode; the answer
        // (every request allowed) does not depend on it, so only the JSON spec is echoed.
        let object = if content_type.contains("protobuf") {
            json!({})
        } else {
            parse_object(&body, &content_type)?
        };
        if resource.kind == "TokenReview" {
            let answer = shared
                .tokens
                .review(&shared.store.lock(), &shared.token, object)?;
            return Ok(json_response(StatusCode::CREATED, &answer));
        }
        return Ok(json_response(
            StatusCode::CREATED,
            &review(&resource, object, user.as_ref()),
        ));
    }
    // events.k8s.io Events are stored as core Events and converted on the way in and out.
    let bridged = events::is_view(&resource);
    let storage = if bridged {
        events::storage(&shared.store.lock())?
    } else {
        resource.clone()
    };
    let view = |object: Value| {
        if bridged {
            events::from_core(&object)
        } else {
            object
        }
    };
    let stored = |object: Value| {
        if bridged {
            events::to_core(&object)
        } else {
            object
        }
    };
    let include_object = query
        .get("includeObject")
        .map(String::as_str)
        .unwrap_or("Metadata")
        .to_owned();

    let answer: Result<Response<Body>, ApiError> = async {
        match (&method, &target.name) {
            (&Method::GET, Some(name)) => {
                let store = shared.store.lock();
                let object = view(api::get(&store, &storage, &namespace, name)?);
                if wants_table(&accept) {
                    return Ok(json_response(
                        StatusCode::OK,
                        &table::to_table(
                            &resource,
                            &[&object],
                            json!({"resourceVersion": store.rv().to_string()}),
                            &include_object,
                            true,
                        ),
                    ));
                }
                if wants_metadata(&accept) {
                    return Ok(json_response(StatusCode::OK, &partial(&object)));
                }
                Ok(json_response(StatusCode::OK, &object))
            }
            (&Method::GET, None) => {
                let options = list_options(&query, &resource)?;
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                    let representation = Representation::of(&accept, &include_object);
                    return watch(
                        shared.clone(),
                        resource.clone(),
                        storage.key(),
                        bridged,
                        target.namespace.clone(),
                        options,
                        &query,
                        representation,
                    );
                }
                let store = shared.store.lock();
                let list = list_view(
                    &store,
                    &resource,
                    &storage,
                    bridged,
                    target.namespace.as_deref(),
                    options,
                )?;
                if wants_table(&accept) {
                    let items: Vec<&Value> = list["items"].as_array().into_iter().flatten().collect();
                    return Ok(json_response(
                        StatusCode::OK,
                        &table::to_table(
                            &resource,
                            &items,
                            list["metadata"].clone(),
                            &include_object,
                            true,
                        ),
                    ));
                }
                if wants_metadata(&accept) {
                    let items: Vec<Value> = list["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(partial)
                        .collect();
                    let list = json!({
                        "kind": "PartialObjectMetadataList",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": list["metadata"].clone(),
                        "items": items,
                    });
                    return Ok(json_response(StatusCode::OK, &list));
                }
                Ok(json_response(StatusCode::OK, &list))
            }
            (&Method::POST, None) => {
                let mut options = write_options(&query, &user_agent)?;
                options.user = user.clone();
                options.events_api = bridged;
                let body = read_body(req).await?;
                let object = stored(parse_object(&body, &content_type)?);
                let created = api::create(
                    &mut shared.store.lock(),
                    &storage,
                    &namespace,
                    object,
                    &mut options,
                )?;
                Ok(with_warnings(
                    json_response(StatusCode::CREATED, &view(created)),
                    &options.warnings,
                ))
            }
            (&Method::PUT, Some(name)) => {
                let mut options = write_options(&query, &user_agent)?;
                options.user = user.clone();
                options.events_api = bridged;
                let body = read_body(req).await?;
                let object = stored(parse_object(&body, &content_type)?);
                let updated = api::update(
                    &mut shared.store.lock(),
                    &storage,
                    &namespace,
                    name,
                    object,
                    part,
                    &mut options,
                )?;
                Ok(with_warnings(
                    json_response(StatusCode::OK, &view(updated)),
                    &options.warnings,
                ))
            }
            (&Method::PATCH, Some(name)) => {
                let kind = PatchKind::from_content_type(&content_type).ok_or_else(|| {
                    ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"))
                })?;
                let mut options = write_options(&query, &user_agent)?;
                options.user = user.clone();
                options.events_api = bridged;
                let body = read_body(req).await?;
                let (patched, created) = {
                    let mut store = shared.store.lock();
                    let before = store.rv();
                    let existed = api::get(&store, &storage, &namespace, name).is_ok();
                    let patched = if bridged {
                        events::patch(
                            &mut store,
                            &storage,
                            &namespace,
                            name,
                            kind,
                            &body,
                            &mut options,
                        )?
                    } else {
                        api::patch(
                            &mut store,
                            &storage,
                            &namespace,
                            name,
                            kind,
                            &body,
                            part,
                            &mut options,
                        )?
                    };
                    (patched, !existed && store.rv() > before)
                };
                let code = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(with_warnings(
                    json_response(code, &patched),
                    &options.warnings,
                ))
            }
            (&Method::DELETE, Some(name)) => {
                let body = read_body(req).await?;
                let options = DeleteOptions::from_body(&body, is_dry_run(&query)?)?;
                let mut store = shared.store.lock();
                let (object, gone) = api::delete(&mut store, &storage, &namespace, name, &options)?;
                if gone && !resource.is_namespace() {
                    return Ok(json_response(
                        StatusCode::OK,
                        &api::deleted_status(&resource, name, &object["metadata"]["uid"]),
                    ));
                }
                Ok(json_response(StatusCode::OK, &view(object)))
            }
            (&Method::DELETE, None) => {
                let body = read_body(req).await?;
                let delete_options = DeleteOptions::from_body(&body, is_dry_run(&query)?)?;
                let options = ListOptions {
                    limit: None,
                    continue_from: None,
                    ..list_options(&query, &resource)?
                };
                let mut store = shared.store.lock();
                let list = list_view(
                    &store,
                    &resource,
                    &storage,
                    bridged,
                    target.namespace.as_deref(),
                    options,
                )?;
                for item in list["items"].as_array().into_iter().flatten() {
                    let ns = item["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned();
                    let name = item["metadata"]["name"].as_str().unwrap_or("").to_owned();
                    match api::delete(&mut store, &storage, &ns, &name, &delete_options) {
                        Ok(_) => {}
                        Err(err) if err.code == 404 => {}
                        Err(err) => return Err(err),
                    }
                }
                Ok(json_response(StatusCode::OK, &list))
            }
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("the server does not allow this method on the requested resource ({method})"),
            )),
        }
    }
    .await;
    // Errors name the resource asked for, as the real server's do.
    answer.map_err(|err| {
        if bridged {
            events::reword(err, &resource)
        } else {
            err
        }
    })
}

/// ComponentStatus: get and list, computed on each request, with the deprecation warning (also
/// on a 404 or a refused watch, as on the real server).
async fn component_statuses(
    method: &Method,
    name: Option<&str>,
    query: &HashMap<String, String>,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let resource = crate::store::builtin_resources()
        .into_iter()
        .find(|r| r.read_only)
        .ok_or_else(|| ApiError::internal("the componentstatuses resource is missing"))?;
    let warnings = [component_status::WARNING.to_owned()];
    if *method != Method::GET {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let answer = match name {
        _ if watch => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "watch is not supported on resources of kind \"componentstatuses\"",
        )),
        Some(name) => component_status::one(name)
            .await
            .ok_or_else(|| ApiError::not_found("componentstatus", name)),
        None => Ok(component_status::list(component_status::all().await)),
    };
    let body = match answer {
        Ok(body) => body,
        Err(err) => return Ok(with_warnings(error_response(&err), &warnings)),
    };
    if wants_table(accept) {
        let items: Vec<&Value> = match body["items"].as_array() {
            Some(items) => items.iter().collect(),
            None => vec![&body],
        };
        return Ok(with_warnings(
            json_response(
                StatusCode::OK,
                &table::to_table(&resource, &items, json!({}), "Metadata", true),
            ),
            &warnings,
        ));
    }
    Ok(with_warnings(
        json_response(StatusCode::OK, &body),
        &warnings,
    ))
}

/// Lists a resource, or the `events.k8s.io` view of the core events (field selectors then
/// apply to the converted objects).
fn list_view(
    store: &Store,
    resource: &Resource,
    storage: &Resource,
    bridged: bool,
    namespace: Option<&str>,
    mut options: ListOptions,
) -> Result<Value, ApiError> {
    if !bridged {
        return api::list(store, resource, namespace, &options);
    }
    let fields = std::mem::take(&mut options.fields);
    let mut list = api::list(store, storage, namespace, &options)?;
    let items: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(events::from_core)
        .filter(|item| fields.matches(item))
        .collect();
    list["items"] = Value::Array(items);
    list["apiVersion"] = json!(resource.api_version());
    Ok(list)
}

/// GET, PUT or PATCH of a custom resource's `scale` subresource: the Scale is read from the
/// object, and a written Scale's `spec.replicas` goes to the object through an update (schema,
/// generation and resourceVersion rules included).
async fn scale_request(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    resource: &Resource,
    namespace: &str,
    name: &str,
    content_type: &str,
    mut options: WriteOptions,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    if method == Method::GET {
        let store = shared.store.lock();
        let object = api::get(&store, resource, namespace, name)?;
        return Ok(json_response(
            StatusCode::OK,
            &scale::to_scale(resource, &object)?,
        ));
    }
    if method != Method::PUT && method != Method::PATCH {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        ));
    }
    let patch_kind = if method == Method::PATCH {
        match PatchKind::from_content_type(content_type) {
            Some(PatchKind::Apply) | None => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
                    ),
                ));
            }
            kind => kind,
        }
    } else {
        None
    };
    let body = read_body(req).await?;
    let mut store = shared.store.lock();
    let object = api::get(&store, resource, namespace, name)?;
    let wanted = match patch_kind {
        None => parse_object(&body, content_type)?,
        Some(kind) => {
            let mut current = scale::to_scale(resource, &object)?;
            let patch: Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            if kind == PatchKind::Json {
                let operations: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut current, &operations).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    )
                })?;
            } else {
                json_patch::merge(&mut current, &patch);
            }
            current
        }
    };
    let current_rv = object["metadata"]["resourceVersion"].clone();
    if let Some(rv) = wanted["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
        && Some(rv) != current_rv.as_str()
    {
        return Err(ApiError::conflict(&resource.qualified_plural(), name));
    }
    let mut updated = object;
    scale::apply_scale(resource, &mut updated, &wanted, name)?;
    let written = api::update(
        &mut store,
        resource,
        namespace,
        name,
        updated,
        Part::Main,
        &mut options,
    )?;
    Ok(with_warnings(
        json_response(StatusCode::OK, &scale::to_scale(resource, &written)?),
        &options.warnings,
    ))
}

/// The answer to an access or identity review: every authenticated user may do everything.
fn review(resource: &Resource, mut object: Value, user: Option<&Value>) -> Value {
    if !object.is_object() {
        object = json!({});
    }
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind);
    object["metadata"] = json!({"creationTimestamp": null});
    object["status"] = match resource.kind.as_str() {
        "SelfSubjectAccessReview" => {
            json!({"allowed": true, "reason": "kube-sim grants every request to its token"})
        }
        "SelfSubjectRulesReview" => {
            json!({"resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}], "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}], "incomplete": false})
        }
        _ => json!({"userInfo": user.cloned().unwrap_or_else(kinds::admin_user)}),
    };
    object
}

fn aggregated_response(doc: &Value) -> Response<Body> {
    let mut res = json_response(StatusCode::OK, doc);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
    );
    res
}

/// Largest request body accepted (the real server's limit is 3 MiB for etcd objects).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// A body over [`MAX_BODY`] is still read (and dropped) up to this size before the 413, so a
/// client still sending it gets the answer rather than a reset connection.
const MAX_DRAINED: usize = 64 * 1024 * 1024;

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = |err: String| {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body is too large or unreadable: {err}"),
        )
    };
    let mut body = req.into_body();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| too_large(err.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > MAX_DRAINED {
            break;
        }
        if seen <= MAX_BODY {
            kept.extend_from_slice(&data);
        }
    }
    if seen > MAX_BODY {
        return Err(too_large(format!(
            "{seen} bytes or more, over the limit of {MAX_BODY}"
        )));
    }
    Ok(Bytes::from(kept))
}

fn parse_object(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    if content_type.contains("protobuf") {
        return crate::protobuf::decode(body)
            .map_err(|e| ApiError::new(415, "UnsupportedMediaType", e.to_string()));
    }
    if content_type.contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?})"
            ),
        ));
    }
    if content_type.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding the body: {e}")))
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Chooses the events of one watch (and converts them for the `events.k8s.io` view).
struct Selector {
    key: ResourceKey,
    namespace: Option<String>,
    options: ListOptions,
    bridged: bool,
}

impl Selector {
    fn select<'a>(&self, key: &ObjectKey, object: &'a Value) -> Option<Cow<'a, Value>> {
        if key.resource != self.key
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| key.namespace != ns)
        {
            return None;
        }
        let object = if self.bridged {
            Cow::Owned(events::from_core(object))
        } else {
            Cow::Borrowed(object)
        };
        (self.options.labels.matches(&object) && self.options.fields.matches(&object))
            .then_some(object)
    }
}

/// Encodes watch events, as objects, (for `kubectl get -w`) as one-row Tables, or as
/// metadata only.
struct Encoder {
    resource: Resource,
    representation: Representation,
    definitions_sent: bool,
}

impl Encoder {
    fn line(&mut self, kind: &str, object: &Value) -> Bytes {
        match &self.representation {
            Representation::Metadata if kind != "ERROR" => watch_line(kind, &partial(object)),
            Representation::Table(include) if kind != "ERROR" && kind != "BOOKMARK" => {
                let rv = object["metadata"]["resourceVersion"].clone();
                let table = table::to_table(
                    &self.resource,
                    &[object],
                    json!({"resourceVersion": rv}),
                    include,
                    !self.definitions_sent,
                );
                self.definitions_sent = true;
                watch_line(kind, &table)
            }
            _ => watch_line(kind, object),
        }
    }
}

/// Starts a watch: initial events (when asked), replay from `resourceVersion`, then live events.
#[allow(clippy::too_many_arguments)]
fn watch(
    shared: Arc<Shared>,
    resource: Resource,
    storage: ResourceKey,
    bridged: bool,
    namespace: Option<String>,
    options: ListOptions,
    query: &HashMap<String, String>,
    representation: Representation,
) -> Result<Response<Body>, ApiError> {
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let requested_rv =
        match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {text:?}"))
            })?),
        };
    let selector = Selector {
        key: storage.clone(),
        namespace: namespace.clone(),
        options,
        bridged,
    };
    let mut encoder = Encoder {
        resource: resource.clone(),
        representation,
        definitions_sent: false,
    };

    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut initial = Vec::new();
    let (mut live, mut closed, start_rv) = {
        let store = shared.store.lock();
        let live = store.subscribe();
        let closed = shared.close_watches.subscribe();
        match requested_rv {
            Some(rv) if !send_initial => match store.events_since(rv, &storage) {
                Some(events) => {
                    for event in &events {
                        if let Some(object) = selector.select(&event.key, &event.object) {
                            initial.push(encoder.line(event.kind, &object));
                        }
                    }
                }
                None => {
                    let status = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", store.compacted_rv()),
                    )
                    .to_status();
                    initial.push(watch_line("ERROR", &status));
                    drop(store);
                    return Ok(stream_response(initial, None));
                }
            },
            _ => {
                // No version (or sendInitialEvents): the current state as ADDED events first.
                for (object_key, object) in store.list_from(&storage, namespace.as_deref(), None) {
                    if let Some(object) = selector.select(object_key, object) {
                        initial.push(encoder.line("ADDED", &object));
                    }
                }
                if send_initial {
                    let bookmark = json!({"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": {"resourceVersion": store.rv().to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                    initial.push(watch_line("BOOKMARK", &bookmark));
                }
            }
        }
        (live, closed, store.rv())
    };
    let kind = resource.kind.clone();
    let api_version = resource.api_version();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut last_rv = start_rv;
        let mut bookmark_tick = tokio::time::interval(Duration::from_secs(30));
        bookmark_tick.tick().await;
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = closed.recv() => return,
                _ = bookmark_tick.tick(), if bookmarks => {
                    let bookmark = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(watch_line("BOOKMARK", &bookmark)).await.is_err() { return; }
                }
                event = live.recv() => match event {
                    Ok(event) => {
                        if event.rv <= start_rv { continue; }
                        last_rv = event.rv;
                        let line = selector
                            .select(&event.key, &event.object)
                            .map(|object| encoder.line(event.kind, &object));
                        if let Some(line) = line
                            && tx.send(line).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher too slow for the event rate is closed; clients re-list.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    Ok(stream_response(Vec::new(), Some(rx)))
}

fn stream_response(initial: Vec<Bytes>, rx: Option<mpsc::Receiver<Bytes>>) -> Response<Body> {
    let head = futures::stream::iter(initial);
    let tail = match rx {
        Some(rx) => tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        None => futures::stream::empty().boxed(),
    };
    let stream = head
        .chain(tail)
        .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    let mut res = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query strings decode percent escapes as clients send them.
    #[test]
    fn query_strings_decode() {
        let query = query_map(Some("labelSelector=app%3Dagent%2Ctier%21%3Dx&watch=true&x"));
        assert_eq!(query["labelSelector"], "app=agent,tier!=x");
        assert_eq!(query["watch"], "true");
        assert_eq!(query["x"], "");
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), Some("%4".into()));
    }
}
