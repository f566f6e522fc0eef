//! The Python face of the engine: `rpc_thrift._worker.Worker`, which runs [`Engine`] with a
//! handler that calls the Python dispatcher (`rpc_thrift.worker`, which wraps the Thrift
//! processor) on the pool threads, and forwards the engine's log lines to Python's `logging`
//! from the thread that called `run()`.
//!
//! The GIL: the connection thread never takes it (pings are echoed while every handler holds
//! it). Pool threads attach once for their whole life (named `rpc_thrift-worker-<n>` in Python
//! as in Rust) and release the GIL while they read the socket, wait for a call or write a
//! reply. `run()` waits in short slices with the GIL released and calls `PyErr_CheckSignals`
//! between slices, so Python-level signal handlers run on the main thread while the worker
//! serves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rpc_frame::{DEFAULT_MAX_FRAME_SIZE, LENGTH_PREFIX, Message};

use crate::engine::{Config, Engine, Handler, Level, LogSink, Outcome, StopSignal};
use crate::errors::{WorkerError, describe, outcome_from};
use crate::protocol::{ADDRESS_ENV, Address, WORKER_GENERATION_ENV, WORKER_ID_ENV, env_number};

/// How long `run()` waits with the GIL released before it checks for signals again.
const POLL: Duration = Duration::from_millis(100);

// The literal default of `max_frame_size` in `Worker::new`'s signature (a literal, so that
// Python's `inspect.signature` shows it) is the frame crate's default.
const _: () = assert!(DEFAULT_MAX_FRAME_SIZE == 16_384_000);

/// Largest `pool_size` accepted (one OS thread each).
const MAX_POOL_SIZE: i64 = 1024;

/// What the engine's threads tell the thread in `run()`.
enum Event {
    /// A line for the `rpc_thrift` logger.
    Log(Level, String),
    /// The engine returned.
    Finished,
}

/// Sends the engine's log lines to the thread in `run()`, which holds the GIL to log them.
struct ChannelLog(mpsc::Sender<Event>);

impl LogSink for ChannelLog {
    fn log(&self, level: Level, message: String) {
        // After run() returned nobody listens; a late line from a straggling handler thread
        // is dropped.
        let _ = self.0.send(Event::Log(level, message));
    }
}

/// Runs calls through the Python dispatcher `dispatch(payload: bytes) -> bytes | None`.
struct PyHandler {
    dispatch: Py<PyAny>,
}

impl Handler for PyHandler {
    fn handle(&self, request: &Message) -> Outcome {
        Python::try_attach(|py| {
            let payload = request.as_wire().get(LENGTH_PREFIX..).unwrap_or_default();
            let payload = PyBytes::new(py, payload);
            match self.dispatch.bind(py).call1((payload,)) {
                Ok(value) => outcome_from(&value),
                Err(err) => Outcome::Failed(describe(py, &err)),
            }
        })
        .unwrap_or_else(|| {
            Outcome::Failed("RuntimeError: the Python interpreter is shutting down".to_owned())
        })
    }

    fn pool_thread(&self, body: &mut dyn FnMut()) {
        // Attach once for the thread's life: the thread state (and `threading.local` data of
        // handlers) survives between calls. Nothing runs once the interpreter is finalizing.
        let _ = Python::try_attach(|py| {
            name_python_thread(py);
            body()
        });
    }

    fn blocking<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        Python::attach(|py| py.detach(f))
    }
}

/// Gives the calling thread its Rust name (`rpc_thrift-worker-<n>` for a pool thread) in
/// Python too: a thread that Python did not start shows as `Dummy-<n>` in
/// `threading.current_thread().name` and in log records otherwise. Best effort: a failure
/// (e.g. a patched `threading`) leaves the Python default.
fn name_python_thread(py: Python<'_>) {
    let Some(name) = std::thread::current().name().map(str::to_owned) else {
        return;
    };
    let _ = py
        .import("threading")
        .and_then(|threading| threading.call_method0("current_thread"))
        .and_then(|thread| thread.setattr("name", name));
}

/// The compiled worker core; `rpc_thrift.RpcWorker` wraps it (signals, the Thrift
/// dispatcher). Docstrings live in `_worker.pyi`.
#[pyclass(module = "rpc_thrift._worker", name = "Worker", frozen)]
pub struct Worker {
    /// Fixed at construction.
    config: Config,
    /// `dispatch(payload: bytes) -> bytes | None`, called on pool threads.
    dispatch: Py<PyAny>,
    /// Shared with `stop()` callers and the engine.
    stop: Arc<StopSignal>,
    /// Guards against two `run()` at once.
    running: AtomicBool,
}

/// Clears [`Worker::running`] when `run()` returns, however it returns.
struct RunningGuard<'a>(&'a AtomicBool);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A positive millisecond count as a duration, or a `ValueError` naming `what`.
fn positive_ms(value: i64, what: &str) -> Result<Duration, WorkerError> {
    u64::try_from(value)
        .ok()
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| WorkerError::InvalidArgument(format!("{what} must be > 0, got {value}")))
}

#[pymethods]
impl Worker {
    #[new]
    #[pyo3(signature = (
        dispatch, address = None, pool_size = 1, service = None, *,
        heartbeat_interval_ms = 1000, heartbeat_timeout_ms = 6000,
        max_frame_size = 16_384_000, stop_timeout_ms = 15000
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        dispatch: Py<PyAny>,
        address: Option<&str>,
        pool_size: i64,
        service: Option<String>,
        heartbeat_interval_ms: i64,
        heartbeat_timeout_ms: i64,
        max_frame_size: i64,
        stop_timeout_ms: i64,
    ) -> PyResult<Self> {
        let address = Address::from_arg_or_env(address, std::env::var_os(ADDRESS_ENV).as_deref())
            .map_err(WorkerError::InvalidArgument)?;
        if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
            return Err(WorkerError::InvalidArgument(format!(
                "pool_size must be between 1 and {MAX_POOL_SIZE}, got {pool_size}"
            ))
            .into());
        }
        let max_frame_size = usize::try_from(max_frame_size)
            .ok()
            .filter(|&size| size > 0 && size <= i32::MAX as usize)
            .ok_or_else(|| {
                WorkerError::InvalidArgument(format!(
                    "max_frame_size must be between 1 and {}, got {max_frame_size}",
                    i32::MAX
                ))
            })?;
        // pool_size was checked to be in 1..=1024 above.
        let mut config = Config::new(address, usize::try_from(pool_size).unwrap_or(1));
        config.service = service.filter(|name| !name.is_empty());
        config.max_frame_size = max_frame_size;
        config.timings.heartbeat_interval =
            positive_ms(heartbeat_interval_ms, "heartbeat_interval_ms")?;
        config.timings.heartbeat_timeout =
            positive_ms(heartbeat_timeout_ms, "heartbeat_timeout_ms")?;
        config.timings.stop_grace = positive_ms(stop_timeout_ms, "stop_timeout_ms")?;
        config.timings.confirm_wait = config.timings.confirm_wait.min(config.timings.stop_grace);
        config.worker_id = env_number(std::env::var_os(WORKER_ID_ENV).as_deref());
        config.generation = env_number(std::env::var_os(WORKER_GENERATION_ENV).as_deref());
        Ok(Self {
            config,
            dispatch,
            stop: Arc::new(StopSignal::new()),
            running: AtomicBool::new(false),
        })
    }

    fn run(&self, py: Python<'_>) -> PyResult<()> {
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(WorkerError::AlreadyRunning.into());
        }
        let _running = RunningGuard(&self.running);
        let (events, inbox) = mpsc::channel();
        let handler = PyHandler {
            dispatch: self.dispatch.clone_ref(py),
        };
        let log = Arc::new(ChannelLog(events.clone()));
        let engine = Engine::new(self.config.clone(), handler, log, Arc::clone(&self.stop));
        let io = std::thread::Builder::new()
            .name("rpc-worker-io".to_owned())
            .spawn(move || {
                engine.run();
                let _ = events.send(Event::Finished);
            })
            .map_err(|err| {
                PyRuntimeError::new_err(format!("cannot start the worker thread: {err}"))
            })?;

        // `detach` wants a `Sync` capture; only this thread ever locks it.
        let inbox = Mutex::new(inbox);
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("rpc_thrift",))?;
        let mut interrupted: Option<PyErr> = None;
        loop {
            match py.detach(|| {
                inbox
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .recv_timeout(POLL)
            }) {
                Ok(Event::Log(level, text)) => {
                    // A failing logging setup must not take the worker down.
                    let _ = logger.call_method1("log", (level.python_level(), text));
                }
                Ok(Event::Finished) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            // Runs Python signal handlers (main thread only; a no-op elsewhere). A handler
            // that raises (e.g. the default SIGINT one) still gets a graceful stop first.
            if let Err(err) = py.check_signals() {
                self.stop.stop();
                interrupted.get_or_insert(err);
            }
        }
        if py.detach(|| io.join()).is_err() {
            return Err(PyRuntimeError::new_err("the worker thread panicked"));
        }
        interrupted.map_or(Ok(()), Err)
    }

    fn stop(&self) {
        self.stop.stop();
    }

    #[getter]
    fn address(&self) -> String {
        self.config.address.to_string()
    }

    #[getter]
    fn pool_size(&self) -> usize {
        self.config.pool_size
    }

    #[getter]
    fn service(&self) -> Option<String> {
        self.config.service.clone()
    }

    #[getter]
    fn worker_id(&self) -> Option<u64> {
        self.config.worker_id
    }

    #[getter]
    fn worker_generation(&self) -> Option<u64> {
        self.config.generation
    }

    #[getter]
    fn stopping(&self) -> bool {
        self.stop.is_requested()
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}
