//! The line parser: `config.ini` text to raw `key -> value` pairs, before any typing.
//!
//! Hand-written rather than `configparser`, which strips inline `;` comments and lowercases
//! keys: CONTRACT section 4 says the value is everything after the first `=`, trimmed, so a
//! password may hold `#`, `;` or `=`. Rules:
//! - blank lines, and lines whose first non-blank character is `#` or `;`, are ignored;
//! - a `[section]` line is tolerated and ignored (keys of every section land in one map);
//! - any other line must be `key=value`; keys are case-sensitive and the last one wins;
//! - an empty value, or the literal `""` (or `''`), means "unset", as in the original's
//!   `front_host=""`.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use crate::keys::{KNOWN_KEYS, is_accepted};
use crate::{ConfigError, ConfigWarning};

/// The raw values of one file plus the warnings it produced.
///
/// Lookups go through [`Values::get`], which also records which keys were asked for, so the
/// tests can check that every key in [`KNOWN_KEYS`] is read by some binary.
#[derive(Debug)]
pub(crate) struct Values {
    /// Key as written to its last value, trimmed (empty when unset).
    entries: HashMap<String, String>,
    /// Unknown keys, in file order, each once.
    warnings: Vec<ConfigWarning>,
    /// Keys looked up so far (test bookkeeping; start-up only, so the cost is nil).
    read: RefCell<BTreeSet<&'static str>>,
}

impl Values {
    /// Splits `text` into key/value pairs.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for a line that is not a comment, a section header or
    /// `key=value` (including `=value` with no key).
    pub(crate) fn parse(text: &str) -> Result<Self, ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut entries = HashMap::new();
        let mut warnings: Vec<ConfigWarning> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') && line.ends_with(']') {
                continue;
            }
            let syntax = || ConfigError::Syntax {
                line: index + 1,
                text: raw.to_owned(),
            };
            let (key, value) = line.split_once('=').ok_or_else(syntax)?;
            let key = key.trim();
            if key.is_empty() {
                return Err(syntax());
            }
            let value = unquote_empty(value.trim());
            if !is_accepted(key) && !warnings.iter().any(|w| w.key == key) {
                warnings.push(ConfigWarning {
                    key: key.to_owned(),
                    message: format!("unknown config key `{key}` ignored (line {})", index + 1),
                });
            }
            entries.insert(key.to_owned(), value.to_owned());
        }
        Ok(Self {
            entries,
            warnings,
            read: RefCell::new(BTreeSet::new()),
        })
    }

    /// The value of `key`, or `None` when absent or empty (unset).
    pub(crate) fn get(&self, key: &'static str) -> Option<&str> {
        debug_assert!(KNOWN_KEYS.contains(&key), "`{key}` missing from KNOWN_KEYS");
        self.read.borrow_mut().insert(key);
        self.entries
            .get(key)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }

    /// The keys looked up so far.
    #[cfg(test)]
    pub(crate) fn read_keys(&self) -> BTreeSet<&'static str> {
        self.read.borrow().clone()
    }

    /// The warnings (unknown keys), in file order.
    pub(crate) fn into_warnings(self) -> Vec<ConfigWarning> {
        self.warnings
    }
}

/// `""` and `''` are the original's spelling of an empty value.
fn unquote_empty(value: &str) -> &str {
    if value == "\"\"" || value == "''" {
        ""
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, key: &'static str) -> Option<String> {
        Values::parse(text).unwrap().get(key).map(str::to_owned)
    }

    #[test]
    fn comments_blank_lines_and_sections_are_ignored() {
        let text = "\n# a comment\n  ; another = comment\n[proxy]\n\t# indented=1\nzk = h:1 \n";
        let values = Values::parse(text).unwrap();
        assert_eq!(values.get("zk"), Some("h:1"));
        assert_eq!(values.entries.len(), 1);
        assert!(values.into_warnings().is_empty());
    }

    #[test]
    fn value_is_everything_after_the_first_equals() {
        assert_eq!(
            value("product = a#b;c=d ", "product").as_deref(),
            Some("a#b;c=d")
        );
        assert_eq!(
            value("product=x # not a comment", "product").as_deref(),
            Some("x # not a comment")
        );
        assert_eq!(
            value("product=x ; not a comment", "product").as_deref(),
            Some("x ; not a comment")
        );
        assert_eq!(value("product==", "product").as_deref(), Some("="));
    }

    #[test]
    fn empty_and_quoted_empty_values_are_unset() {
        assert_eq!(value("front_host=", "front_host"), None);
        assert_eq!(value("front_host=  ", "front_host"), None);
        assert_eq!(value("front_host=\"\"", "front_host"), None);
        assert_eq!(value("front_host = '' ", "front_host"), None);
        assert_eq!(value("", "front_host"), None);
        assert_eq!(
            value("front_host=\"a\"", "front_host").as_deref(),
            Some("\"a\"")
        );
    }

    #[test]
    fn last_duplicate_wins() {
        assert_eq!(
            value("product=a\nproduct=b", "product").as_deref(),
            Some("b")
        );
        // An empty later value unsets an earlier one.
        assert_eq!(value("product=a\nproduct=", "product"), None);
    }

    #[test]
    fn crlf_and_bom_are_handled() {
        assert_eq!(
            value("\u{feff}zk=h:1\r\nproduct=p\r\n", "zk").as_deref(),
            Some("h:1")
        );
        assert_eq!(
            value("zk=h:1\r\nproduct=p\r\n", "product").as_deref(),
            Some("p")
        );
    }

    #[test]
    fn line_without_equals_is_a_syntax_error() {
        let err = Values::parse("zk=h:1\n\njust words\n").unwrap_err();
        match &err {
            ConfigError::Syntax { line, text } => {
                assert_eq!(*line, 3);
                assert_eq!(text, "just words");
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.to_string().contains('\n'));
        assert!(matches!(
            Values::parse(" = value").unwrap_err(),
            ConfigError::Syntax { line: 1, .. }
        ));
        assert!(matches!(
            Values::parse("[unterminated").unwrap_err(),
            ConfigError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn unknown_keys_warn_once_in_file_order() {
        let values = Values::parse("foo=1\nzk=h:1\nBar=2\nfoo=3\nZK=h:2\n").unwrap();
        let warnings = values.into_warnings();
        let keys: Vec<_> = warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["foo", "Bar", "ZK"]);
        assert_eq!(
            warnings[0].message,
            "unknown config key `foo` ignored (line 1)"
        );
        assert!(
            warnings
                .iter()
                .all(|w| w.message.contains(&format!("`{}`", w.key)))
        );
    }

    #[test]
    fn legacy_keys_do_not_warn() {
        let text = "profile=0\nfalcon_client=http://127.0.0.1:1988/v1/push\nrpc_timeout=5\nstand_alone=0\n";
        assert!(Values::parse(text).unwrap().into_warnings().is_empty());
    }

    #[test]
    fn lookups_are_recorded() {
        let values = Values::parse("zk=h:1").unwrap();
        let _ = values.get("zk");
        let _ = values.get("product");
        assert_eq!(values.read_keys(), BTreeSet::from(["product", "zk"]));
    }
}
