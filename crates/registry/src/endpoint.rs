//! The endpoint node's JSON (CONTRACT section 3): what an LB writes when it registers and
//! what discovery reads back for the proxy's routing table.

use serde::{Deserialize, Serialize};

/// The JSON data of an endpoint node. Unknown fields are ignored when reading; missing
/// optional fields read as empty strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndpointInfo {
    /// The service name.
    pub service: String,
    /// The node name (see [`service_id`](crate::service_id)).
    pub service_id: String,
    /// `host:port`, or a unix path: where proxies connect.
    pub frontend: String,
    /// `--work-dir` of the LB.
    #[serde(default)]
    pub deploy_path: String,
    /// `--code-url-version` of the LB.
    #[serde(default)]
    pub code_url_version: String,
    /// Host name of the LB.
    #[serde(default)]
    pub hostname: String,
    /// `YYYY-MM-DD HH:MM:SS`.
    #[serde(default)]
    pub start_time: String,
    /// `1` when the LB marks the `TApplicationException`s it raises itself with field 3
    /// (CONTRACT section 9); absent (0) for the Go original and plain servers. A proxy trusts
    /// field 3 only from endpoints that announce it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub marks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One endpoint of a service as discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The node name under the service.
    pub node: String,
    /// The node's data.
    pub info: EndpointInfo,
}

// === impl EndpointInfo ===

impl EndpointInfo {
    /// Parses node data. Unknown fields are ignored (new writers may add some); `service`,
    /// `service_id` and `frontend` are required.
    pub(crate) fn from_json(data: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(data)
    }
}

/// The current local time as `YYYY-MM-DD HH:MM:SS`, the format of
/// [`EndpointInfo::start_time`].
pub fn now_start_time() -> String {
    chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_original_json_and_ignores_unknown_fields() {
        let data = br#"{"service":"typo","service_id":"10_4_10_2_5555","frontend":"10.4.10.2:5555",
            "deploy_path":"/home/w/typo","code_url_version":"git@host:grp/typo.git@936d577",
            "hostname":"web1","start_time":"2017-07-08 12:00:00","workers":4}"#;
        let info = EndpointInfo::from_json(data).unwrap();
        assert_eq!(info.service, "typo");
        assert_eq!(info.frontend, "10.4.10.2:5555");
        assert_eq!(info.start_time, "2017-07-08 12:00:00");
        assert_eq!(info.marks, 0, "the original announces no marks");
    }

    #[test]
    fn marks_are_written_only_when_set() {
        let mut info = EndpointInfo {
            service: "s".into(),
            service_id: "id".into(),
            frontend: "h:1".into(),
            ..Default::default()
        };
        let plain = serde_json::to_string(&info).unwrap();
        assert!(!plain.contains("marks"), "{plain}");
        info.marks = 1;
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains(r#""marks":1"#), "{json}");
        assert_eq!(EndpointInfo::from_json(json.as_bytes()).unwrap().marks, 1);
    }

    #[test]
    fn optional_fields_default_and_required_ones_do_not() {
        let info = EndpointInfo::from_json(br#"{"service":"s","service_id":"x","frontend":"h:1"}"#)
            .unwrap();
        assert_eq!(info.hostname, "");
        assert!(EndpointInfo::from_json(br#"{"service":"s","service_id":"x"}"#).is_err());
        assert!(EndpointInfo::from_json(b"not json").is_err());
    }

    #[test]
    fn round_trips() {
        let info = EndpointInfo {
            service: "s".into(),
            service_id: "id".into(),
            frontend: "/tmp/s.sock".into(),
            start_time: now_start_time(),
            ..Default::default()
        };
        let json = serde_json::to_vec(&info).unwrap();
        assert_eq!(EndpointInfo::from_json(&json).unwrap(), info);
    }

    #[test]
    fn start_time_format() {
        let t = now_start_time();
        assert_eq!(t.len(), 19, "{t}");
        assert!(
            chrono::NaiveDateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S").is_ok(),
            "{t}"
        );
    }
}
