//! Every conversion between Rust failures and Python exceptions at the extension's edge:
//! bad constructor arguments become `ValueError`, a second `run()` a `RuntimeError`, and a
//! Python exception raised while processing a call becomes the `Type: message` text of the
//! code-6 `TApplicationException` sent back (CONTRACT section 2).

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::Outcome;

/// Why a worker could not be built or run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerError {
    /// A constructor argument is out of range; the text names it.
    InvalidArgument(String),
    /// `run()` was called while the same worker is already running.
    AlreadyRunning,
}

impl From<WorkerError> for PyErr {
    fn from(err: WorkerError) -> Self {
        match err {
            WorkerError::InvalidArgument(text) => PyValueError::new_err(text),
            WorkerError::AlreadyRunning => {
                PyRuntimeError::new_err("this RpcWorker is already running")
            }
        }
    }
}

/// `Type: message` for a Python exception, as in a traceback's last line: the type's
/// qualified name (module omitted for builtins), then `str(exc)` when it is not empty.
pub fn describe(py: Python<'_>, err: &PyErr) -> String {
    use pyo3::types::PyTypeMethods as _;
    let name = err
        .get_type(py)
        .fully_qualified_name()
        .map_or_else(|_| "Exception".to_owned(), |name| name.to_string());
    let text = err
        .value(py)
        .str()
        .map_or_else(|_| String::new(), |text| text.to_string());
    if text.is_empty() {
        name
    } else {
        format!("{name}: {text}")
    }
}

/// The handler outcome for what the Python dispatcher returned: the reply message bytes, or
/// `None`/`b""` for no reply.
pub fn outcome_from(value: &Bound<'_, PyAny>) -> Outcome {
    if value.is_none() {
        return Outcome::NoReply;
    }
    match value.cast::<PyBytes>() {
        Ok(bytes) if bytes.as_bytes().is_empty() => Outcome::NoReply,
        Ok(bytes) => Outcome::Reply(bytes.as_bytes().to_vec()),
        Err(_) => Outcome::Failed(format!(
            "TypeError: the dispatcher returned {}, not bytes",
            value
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |name| name.to_string())
        )),
    }
}
