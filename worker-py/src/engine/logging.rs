//! The engine's log lines: their [`Level`] and the [`LogSink`] they go to (the Python
//! extension forwards them to Python's `logging`, the unit tests to stderr). Every other part of
//! the engine writes here; nothing reads back.

/// Severity of a log line (maps onto Python's `logging` levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Per-event detail.
    Debug,
    /// State changes: connected, stopping, stopped.
    Info,
    /// Something went wrong and was handled (reconnecting, a bad frame).
    Warning,
    /// Something could not be handled.
    Error,
}

impl Level {
    /// The numeric level of Python's `logging` module.
    pub fn python_level(self) -> i32 {
        match self {
            Self::Debug => 10,
            Self::Info => 20,
            Self::Warning => 30,
            Self::Error => 40,
        }
    }
}

/// Where the engine's log lines go. Called from the engine's threads; the reader may hold the
/// uncontended lock of the connection's read side.
pub trait LogSink: Send + Sync {
    /// Records one line.
    fn log(&self, level: Level, message: String);
}
