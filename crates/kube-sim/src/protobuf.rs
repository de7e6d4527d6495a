//! Decoding of the Kubernetes protobuf envelope for the built-in kinds kubectl's generators send
//! (`kubectl create namespace|secret|configmap|serviceaccount` post `application/vnd.kubernetes.protobuf`).
//!
//! The envelope is the magic `k8s\0` followed by a `runtime.Unknown` message whose `raw` field
//! holds the typed object. Only the fields those commands set are decoded; anything else is an
//! error rather than a silently dropped field.

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("protobuf body: {0}")]
pub struct DecodeError(String);

fn err(message: impl Into<String>) -> DecodeError {
    DecodeError(message.into())
}

/// One field of a message.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or_else(|| err("truncated varint"))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(err("varint too long"))
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, DecodeError> {
        if self.pos >= self.bytes.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let field = match tag & 7 {
            0 => Field::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| err("length overflow"))?;
                let end = self
                    .pos
                    .checked_add(len)
                    .filter(|end| *end <= self.bytes.len())
                    .ok_or_else(|| err("truncated field"))?;
                let bytes = &self.bytes[self.pos..end];
                self.pos = end;
                Field::Bytes(bytes)
            }
            1 => {
                self.pos = self
                    .pos
                    .checked_add(8)
                    .filter(|p| *p <= self.bytes.len())
                    .ok_or_else(|| err("truncated fixed64"))?;
                Field::Varint(0)
            }
            5 => {
                self.pos = self
                    .pos
                    .checked_add(4)
                    .filter(|p| *p <= self.bytes.len())
                    .ok_or_else(|| err("truncated fixed32"))?;
                Field::Varint(0)
            }
            wire => return Err(err(format!("unsupported wire type {wire}"))),
        };
        Ok(Some((tag >> 3, field)))
    }
}

fn text(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| err("invalid UTF-8 string"))
}

fn bytes_of<'a>(field: Field<'a>, what: &str) -> Result<&'a [u8], DecodeError> {
    match field {
        Field::Bytes(bytes) => Ok(bytes),
        Field::Varint(_) => Err(err(format!("{what}: expected a length-delimited field"))),
    }
}

/// Decodes a map entry (`key` = 1, `value` = 2); values are strings or base64 of bytes.
fn map_entry(bytes: &[u8], binary_value: bool) -> Result<(String, Value), DecodeError> {
    let mut reader = Reader::new(bytes);
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    while let Some((number, field)) = reader.next()? {
        let raw = bytes_of(field, "map entry")?;
        match number {
            1 => key = text(raw)?,
            2 if binary_value => {
                value = json!(base64::engine::general_purpose::STANDARD.encode(raw))
            }
            2 => value = json!(text(raw)?),
            _ => {}
        }
    }
    Ok((key, value))
}

fn object_meta(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut meta = Map::new();
    let mut reader = Reader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match number {
            1 => {
                meta.insert("name".into(), json!(text(bytes_of(field, "name")?)?));
            }
            2 => {
                meta.insert(
                    "generateName".into(),
                    json!(text(bytes_of(field, "generateName")?)?),
                );
            }
            3 => {
                meta.insert(
                    "namespace".into(),
                    json!(text(bytes_of(field, "namespace")?)?),
                );
            }
            11 | 12 => {
                let (key, value) = map_entry(bytes_of(field, "labels")?, false)?;
                let name = if number == 11 {
                    "labels"
                } else {
                    "annotations"
                };
                meta.entry(name).or_insert_with(|| json!({}))[key] = value;
            }
            14 => {
                let finalizer = json!(text(bytes_of(field, "finalizers")?)?);
                if let Some(list) = meta
                    .entry("finalizers")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                {
                    list.push(finalizer);
                }
            }
            // An update's precondition.
            6 => {
                let rv = text(bytes_of(field, "resourceVersion")?)?;
                if !rv.is_empty() {
                    meta.insert("resourceVersion".into(), json!(rv));
                }
            }
            // uid, timestamps and managedFields are set by the server.
            4 | 5 | 7..=10 | 13 | 15..=17 => {}
            other => return Err(err(format!("ObjectMeta field {other} is not supported"))),
        }
    }
    Ok(Value::Object(meta))
}

/// Pushes a string onto the list at `object[name]`.
fn push(object: &mut Value, name: &str, item: Value) {
    if !object[name].is_array() {
        object[name] = json!([]);
    }
    if let Some(list) = object[name].as_array_mut() {
        list.push(item);
    }
}

fn base64_of(bytes: &[u8]) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `certificates.k8s.io/v1` CertificateSigningRequestSpec.
fn csr_spec(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut spec = json!({});
    let mut reader = Reader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match (number, field) {
            (1, field) => spec["request"] = base64_of(bytes_of(field, "request")?),
            (2, field) => spec["username"] = json!(text(bytes_of(field, "username")?)?),
            (3, field) => spec["uid"] = json!(text(bytes_of(field, "uid")?)?),
            (4, field) => push(
                &mut spec,
                "groups",
                json!(text(bytes_of(field, "groups")?)?),
            ),
            (5, field) => push(
                &mut spec,
                "usages",
                json!(text(bytes_of(field, "usages")?)?),
            ),
            (6, field) => {
                let mut entry = Reader::new(bytes_of(field, "extra")?);
                let (mut key, mut items) = (String::new(), Vec::new());
                while let Some((n, f)) = entry.next()? {
                    match n {
                        1 => key = text(bytes_of(f, "extra key")?)?,
                        2 => {
                            let mut value = Reader::new(bytes_of(f, "extra value")?);
                            while let Some((_, item)) = value.next()? {
                                items.push(json!(text(bytes_of(item, "extra item")?)?));
                            }
                        }
                        _ => {}
                    }
                }
                if !spec["extra"].is_object() {
                    spec["extra"] = json!({});
                }
                spec["extra"][key] = json!(items);
            }
            (7, field) => spec["signerName"] = json!(text(bytes_of(field, "signerName")?)?),
            (8, Field::Varint(v)) => spec["expirationSeconds"] = json!(v as i32),
            (other, _) => {
                return Err(err(format!(
                    "CertificateSigningRequestSpec field {other} is not supported; send JSON"
                )));
            }
        }
    }
    Ok(spec)
}

/// `authentication.k8s.io/v1` TokenRequestSpec (what `kubectl create token` sends).
fn token_request_spec(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut spec = json!({});
    let mut reader = Reader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match (number, field) {
            (1, field) => push(
                &mut spec,
                "audiences",
                json!(text(bytes_of(field, "audiences")?)?),
            ),
            (3, field) => {
                let mut reference = json!({});
                let mut fields = Reader::new(bytes_of(field, "boundObjectRef")?);
                while let Some((n, f)) = fields.next()? {
                    let name = match n {
                        1 => "kind",
                        2 => "apiVersion",
                        3 => "name",
                        4 => "uid",
                        _ => continue,
                    };
                    reference[name] = json!(text(bytes_of(f, name)?)?);
                }
                spec["boundObjectRef"] = reference;
            }
            (4, Field::Varint(v)) => spec["expirationSeconds"] = json!(v as i64),
            (other, _) => {
                return Err(err(format!(
                    "TokenRequestSpec field {other} is not supported; send JSON"
                )));
            }
        }
    }
    Ok(spec)
}

/// `meta/v1` Time (seconds since the epoch) as RFC 3339; `None` for Go's zero time (sent as
/// zero seconds, or as the seconds of year 1), which JSON leaves out.
fn time(bytes: &[u8]) -> Result<Option<Value>, DecodeError> {
    let mut seconds = 0i64;
    let mut reader = Reader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        if let (1, Field::Varint(v)) = (number, field) {
            seconds = v as i64;
        }
    }
    const YEAR_ONE: i64 = -62_135_596_800;
    if seconds == 0 || seconds == YEAR_ONE {
        return Ok(None);
    }
    let time =
        chrono::DateTime::from_timestamp(seconds, 0).ok_or_else(|| err("time out of range"))?;
    Ok(Some(json!(
        time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )))
}

/// `certificates.k8s.io/v1` CertificateSigningRequestStatus.
fn csr_status(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut status = json!({});
    let mut reader = Reader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match number {
            1 => {
                let mut condition = json!({});
                let mut fields = Reader::new(bytes_of(field, "conditions")?);
                while let Some((n, f)) = fields.next()? {
                    let name = match n {
                        1 => "type",
                        2 => "reason",
                        3 => "message",
                        4 => "lastUpdateTime",
                        5 => "lastTransitionTime",
                        6 => "status",
                        _ => continue,
                    };
                    let raw = bytes_of(f, name)?;
                    if n == 4 || n == 5 {
                        if let Some(time) = time(raw)? {
                            condition[name] = time;
                        }
                    } else {
                        condition[name] = json!(text(raw)?);
                    }
                }
                push(&mut status, "conditions", condition);
            }
            2 => status["certificate"] = base64_of(bytes_of(field, "certificate")?),
            other => {
                return Err(err(format!(
                    "CertificateSigningRequestStatus field {other} is not supported; send JSON"
                )));
            }
        }
    }
    Ok(status)
}

/// Decodes a `k8s\0`-prefixed protobuf body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, DecodeError> {
    let envelope = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| err("missing the k8s\\0 magic"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    let mut reader = Reader::new(envelope);
    while let Some((number, field)) = reader.next()? {
        match number {
            1 => {
                let mut type_meta = Reader::new(bytes_of(field, "typeMeta")?);
                while let Some((n, f)) = type_meta.next()? {
                    match n {
                        1 => api_version = text(bytes_of(f, "apiVersion")?)?,
                        2 => kind = text(bytes_of(f, "kind")?)?,
                        _ => {}
                    }
                }
            }
            2 => raw = bytes_of(field, "raw")?,
            _ => {}
        }
    }
    let mut object = json!({"apiVersion": api_version, "kind": kind});
    let mut reader = Reader::new(raw);
    while let Some((number, field)) = reader.next()? {
        match (kind.as_str(), number, field) {
            (_, 1, field) => object["metadata"] = object_meta(bytes_of(field, "metadata")?)?,
            ("Namespace", 2, field) => {
                let mut spec = Reader::new(bytes_of(field, "spec")?);
                let mut finalizers = Vec::new();
                while let Some((n, f)) = spec.next()? {
                    if n == 1 {
                        finalizers.push(json!(text(bytes_of(f, "finalizers")?)?));
                    }
                }
                object["spec"] = json!({"finalizers": finalizers});
            }
            ("Namespace", 3, _) => {}
            ("Secret", 2, field) | ("ConfigMap", 3, field) => {
                let (key, value) = map_entry(bytes_of(field, "data")?, true)?;
                let name = if kind == "Secret" {
                    "data"
                } else {
                    "binaryData"
                };
                if !object[name].is_object() {
                    object[name] = json!({});
                }
                object[name][key] = value;
            }
            ("Secret", 4, field) | ("ConfigMap", 2, field) => {
                let (key, value) = map_entry(bytes_of(field, "data")?, false)?;
                let name = if kind == "Secret" {
                    "stringData"
                } else {
                    "data"
                };
                if !object[name].is_object() {
                    object[name] = json!({});
                }
                object[name][key] = value;
            }
            ("Secret", 3, field) => object["type"] = json!(text(bytes_of(field, "type")?)?),
            ("Secret", 5, Field::Varint(v)) | ("ConfigMap", 4, Field::Varint(v)) => {
                object["immutable"] = json!(v != 0)
            }
            ("CertificateSigningRequest", 2, field) => {
                object["spec"] = csr_spec(bytes_of(field, "spec")?)?;
            }
            ("TokenRequest", 2, field) => {
                object["spec"] = token_request_spec(bytes_of(field, "spec")?)?;
            }
            ("TokenRequest", 3, _) => {}
            ("CertificateSigningRequest", 3, field) => {
                object["status"] = csr_status(bytes_of(field, "status")?)?;
            }
            ("ServiceAccount", 4, Field::Varint(v)) => {
                object["automountServiceAccountToken"] = json!(v != 0)
            }
            (kind, number, _) => {
                return Err(err(format!(
                    "{kind} field {number} is not supported; send JSON"
                )));
            }
        }
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    /// A Secret as `kubectl create secret generic --from-literal` encodes it.
    #[test]
    fn decodes_a_secret() {
        let meta = [field(1, b"ca"), field(3, b"org")].concat();
        let entry = [field(1, b"ca.crt"), field(2, b"PEM")].concat();
        let raw = [field(1, &meta), field(2, &entry), field(3, b"Opaque")].concat();
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        let object = decode(&body).expect("decodes");
        assert_eq!(object["metadata"]["name"], "ca");
        assert_eq!(object["data"]["ca.crt"], "UEVN");
        assert_eq!(object["type"], "Opaque");
    }

    /// Truncated and unknown input is an error, never a panic.
    #[test]
    fn rejects_garbage() {
        assert!(decode(b"nope").is_err());
        assert!(decode(b"k8s\0\x0a\xff").is_err());
        for len in 0..40u8 {
            let body: Vec<u8> = b"k8s\0"
                .iter()
                .copied()
                .chain((0..len).map(|i| i.wrapping_mul(37)))
                .collect();
            let _ = decode(&body);
        }
    }
}
