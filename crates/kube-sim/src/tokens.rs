//! ServiceAccount tokens: the `serviceaccounts/token` subresource (TokenRequest) issues them,
//! the bearer-token check and `authentication.k8s.io/v1` TokenReview accept them (and the
//! server's own token) until they expire or their ServiceAccount is gone.
//!
//! A token is a JWT with the real server's claims, signed with HMAC-SHA256 (`HS256`) under a key
//! derived from the server's own token, so it stays valid across restarts with a data directory
//! (which keeps that token) and nothing needs to be remembered per token.

use base64::Engine as _;
use chrono::{Duration, Utc};
use serde_json::{Value, json};

use crate::{
    error::ApiError,
    kinds,
    store::{ObjectKey, ResourceKey, Store},
};

/// The API server's audience, which tokens get by default and bearer tokens must carry (the
/// real server's default: its issuer, as kubeadm and the test cluster set it).
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Shortest and longest lifetimes a TokenRequest may ask for.
const MIN_SECONDS: i64 = 600;
const MAX_SECONDS: i64 = 1 << 32;
const DEFAULT_SECONDS: i64 = 3600;

/// What a valid token says.
#[derive(Debug, Clone)]
struct Claims {
    namespace: String,
    name: String,
    uid: String,
    audiences: Vec<String>,
    jti: String,
}

/// Issues and checks this server's ServiceAccount tokens.
pub struct Tokens {
    key: rustls::crypto::tls13::OkmBlock,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens")
    }
}

fn encode(value: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

fn decode(part: &str) -> Option<Value> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A Go `%q` of a string list: `["a" "b"]`.
fn quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::invalid(
        "TokenRequest.authentication.k8s.io",
        "",
        &[(field.into(), message)],
    )
}

impl Tokens {
    /// Tokens signed under a key derived from the server's own token.
    pub fn new(server_token: &str) -> Self {
        let bytes = server_token.as_bytes();
        let key = rustls::crypto::tls13::OkmBlock::new(&bytes[..bytes.len().min(64)]);
        Self { key }
    }

    /// HMAC-SHA256 of a token's signed part.
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        match suite.tls13() {
            Some(suite) => suite
                .hkdf_provider
                .hmac_sign(&self.key, message)
                .as_ref()
                .to_vec(),
            None => Vec::new(),
        }
    }

    /// The claims of a token this server signed that has not expired.
    fn verify(&self, token: &str) -> Option<Claims> {
        let (signed, signature) = token.rsplit_once('.')?;
        let (_, payload) = signed.split_once('.')?;
        let expected = self.sign(signed.as_bytes());
        let given = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .ok()?;
        if expected.is_empty() || given.len() != expected.len() {
            return None;
        }
        // Compared without an early exit.
        if given
            .iter()
            .zip(&expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return None;
        }
        let claims = decode(payload)?;
        if claims["exp"].as_i64()? <= Utc::now().timestamp() {
            return None;
        }
        let account = &claims["kubernetes.io"];
        Some(Claims {
            namespace: account["namespace"].as_str()?.to_owned(),
            name: account["serviceaccount"]["name"].as_str()?.to_owned(),
            uid: account["serviceaccount"]["uid"].as_str()?.to_owned(),
            audiences: claims["aud"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            jti: claims["jti"].as_str()?.to_owned(),
        })
    }

    /// Answers a TokenRequest for ServiceAccount `namespace/name`.
    pub fn issue(
        &self,
        store: &Store,
        namespace: &str,
        name: &str,
        request: &Value,
    ) -> Result<Value, ApiError> {
        let key = ObjectKey {
            resource: ResourceKey {
                group: String::new(),
                plural: "serviceaccounts".into(),
            },
            namespace: namespace.into(),
            name: name.into(),
        };
        let account = store
            .get(&key)
            .ok_or_else(|| ApiError::not_found("serviceaccounts", name))?;
        let uid = account["metadata"]["uid"].as_str().unwrap_or("").to_owned();
        let spec = &request["spec"];
        let seconds = match &spec["expirationSeconds"] {
            Value::Null => DEFAULT_SECONDS,
            value => value.as_i64().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "TokenRequest in version \"v1\" cannot be handled as a TokenRequest: spec.expirationSeconds: {value} is not an integer"
                ))
            })?,
        };
        if seconds < MIN_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                format!(
                    "Invalid value: {seconds}: may not specify a duration less than 10 minutes"
                ),
            ));
        }
        if seconds > MAX_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                format!(
                    "Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds"
                ),
            ));
        }
        let mut audiences: Vec<String> = spec["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        if audiences.is_empty() {
            audiences.push(DEFAULT_AUDIENCE.into());
        }
        let now = Utc::now();
        let expires = now + Duration::seconds(seconds);
        let jti = uuid::Uuid::new_v4().to_string();
        let claims = json!({
            "aud": audiences,
            "exp": expires.timestamp(),
            "iat": now.timestamp(),
            "iss": DEFAULT_AUDIENCE,
            "jti": jti,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
            "nbf": now.timestamp(),
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
        });
        let signed = format!(
            "{}.{}",
            encode(&json!({"alg": "HS256", "kid": "kube-sim"})),
            encode(&claims)
        );
        let signature =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.sign(signed.as_bytes()));
        let token = format!("{signed}.{signature}");
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                "creationTimestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
            "spec": {"audiences": audiences, "expirationSeconds": seconds,
                "boundObjectRef": spec.get("boundObjectRef").cloned().unwrap_or(Value::Null)},
            "status": {"token": token,
                "expirationTimestamp": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
        }))
    }

    /// Authenticates a token for these audiences (the API server's when empty): the user and
    /// the audiences it was accepted for, or the reason it was not.
    pub fn authenticate(
        &self,
        store: &Store,
        admin_token: &str,
        token: &str,
        audiences: &[String],
    ) -> Result<(Value, Vec<String>), String> {
        let targets: Vec<String> = if audiences.is_empty() {
            vec![DEFAULT_AUDIENCE.into()]
        } else {
            audiences.to_vec()
        };
        if token == admin_token {
            if !targets.iter().any(|t| t == DEFAULT_AUDIENCE) {
                return Err(format!(
                    "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                    quoted(&[DEFAULT_AUDIENCE.into()]),
                    quoted(&targets)
                ));
            }
            return Ok((kinds::admin_user(), vec![DEFAULT_AUDIENCE.into()]));
        }
        let Some(issued) = self.verify(token) else {
            return Err("invalid bearer token".into());
        };
        let accepted: Vec<String> = targets
            .iter()
            .filter(|t| issued.audiences.contains(t))
            .cloned()
            .collect();
        if accepted.is_empty() {
            return Err(format!(
                "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                quoted(&issued.audiences),
                quoted(&targets)
            ));
        }
        let key = ObjectKey {
            resource: ResourceKey {
                group: String::new(),
                plural: "serviceaccounts".into(),
            },
            namespace: issued.namespace.clone(),
            name: issued.name.clone(),
        };
        let current = store
            .get(&key)
            .and_then(|account| account["metadata"]["uid"].as_str().map(str::to_owned));
        if current.as_deref() != Some(issued.uid.as_str()) {
            return Err(format!(
                "[invalid bearer token, service account {}/{} has been deleted]",
                issued.namespace, issued.name
            ));
        }
        let user = json!({
            "username": format!("system:serviceaccount:{}:{}", issued.namespace, issued.name),
            "uid": issued.uid,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", issued.namespace), "system:authenticated"],
            "extra": {"authentication.kubernetes.io/credential-id": [format!("JTI={}", issued.jti)]},
        });
        Ok((user, accepted))
    }

    /// Answers a TokenReview.
    pub fn review(
        &self,
        store: &Store,
        admin_token: &str,
        mut review: Value,
    ) -> Result<Value, ApiError> {
        if !review.is_object() {
            review = json!({});
        }
        let token = review["spec"]["token"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            return Err(ApiError::bad_request(
                "token is required for TokenReview in authentication",
            ));
        }
        let audiences: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        review["apiVersion"] = json!("authentication.k8s.io/v1");
        review["kind"] = json!("TokenReview");
        if !review["metadata"].is_object() {
            review["metadata"] = json!({});
        }
        review["status"] = match self.authenticate(store, admin_token, &token, &audiences) {
            Ok((user, accepted)) => {
                json!({"authenticated": true, "user": user, "audiences": accepted})
            }
            Err(error) => json!({"user": {}, "error": error}),
        };
        Ok(review)
    }
}
