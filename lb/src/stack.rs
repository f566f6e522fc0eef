//! Reading a Python worker's stack dump: the text `faulthandler` writes for every thread when
//! `rpc_thrift` gets SIGUSR1 (CONTRACT section 9, "LB supervision"). The watchdog
//! ([`crate::watchdog`]) collects the dump from a hung worker's stderr and names the frame
//! where its handler was stuck ([`blame`]) in the message its callers get.
//!
//! What `faulthandler` prints (CPython 3.8 and later), threads newest first:
//! ```text
//! Thread 0x00007f0c2a7fc6c0 (most recent call first):
//!   File "/usr/lib/python3.11/threading.py", line 320 in wait
//!   File "/srv/app/handlers.py", line 12 in sleep_ms
//!   File "/usr/lib/python3/dist-packages/rpc_thrift/worker.py", line 88 in handle_call
//!
//! Current thread 0x00007f0c2b9c4740 (most recent call first):
//!   File "/usr/lib/python3/dist-packages/rpc_thrift/worker.py", line 240 in run
//!   File "/srv/app/worker.py", line 30 in <module>
//! ```

/// One frame of a thread's stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The file as `faulthandler` prints it.
    pub file: String,
    /// The line number.
    pub line: u32,
    /// The function's name.
    pub function: String,
}

impl Frame {
    /// `<file>:<line> in <function>`, as the watchdog's message names it.
    pub fn describe(&self) -> String {
        format!("{}:{} in {}", self.file, self.line, self.function)
    }

    /// Whether the frame is in the Python standard library (or frozen bootstrap code): its
    /// file lies in a `pythonX.Y` directory outside `site-packages` / `dist-packages`.
    fn is_stdlib(&self) -> bool {
        let file = self.file.as_str();
        if file.starts_with('<') {
            return true;
        }
        if file.contains("/site-packages/") || file.contains("/dist-packages/") {
            return false;
        }
        file.split('/').any(|part| {
            part.strip_prefix("python")
                .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        })
    }

    /// Whether the frame is in the `rpc_thrift` package.
    fn is_rpc_thrift(&self) -> bool {
        self.file.contains("/rpc_thrift/")
    }
}

/// One thread of a dump, innermost frame first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// The thread id as printed (`0x...`).
    pub id: String,
    /// Whether it is the thread that took the signal.
    pub current: bool,
    /// Its frames, most recent call first.
    pub frames: Vec<Frame>,
}

impl Thread {
    /// Whether it ran a call: `rpc_thrift`'s `handle_call` (`__call__` in older releases)
    /// is the outermost frame of every call's stack. (The main thread has an `rpc_thrift`
    /// frame too, `run`, but never this one.)
    fn is_handler(&self) -> bool {
        self.frames
            .iter()
            .any(|f| f.is_rpc_thrift() && matches!(f.function.as_str(), "handle_call" | "__call__"))
    }

    /// Its innermost frame outside the standard library and `rpc_thrift`.
    fn culprit(&self) -> Option<&Frame> {
        self.frames
            .iter()
            .find(|f| !f.is_stdlib() && !f.is_rpc_thrift())
    }
}

/// Parses the threads out of `lines` (other lines, such as the worker's own logging, are
/// skipped).
pub fn parse(lines: &[String]) -> Vec<Thread> {
    let mut threads: Vec<Thread> = Vec::new();
    let mut open = false;
    for line in lines {
        if let Some(thread) = thread_header(line) {
            threads.push(thread);
            open = true;
            continue;
        }
        match (open, frame_line(line), threads.last_mut()) {
            (true, Some(frame), Some(thread)) => thread.frames.push(frame),
            // `  <no Python frame>` and similar keep the thread open.
            (true, None, _) if line.starts_with("  ") => {}
            _ => open = false,
        }
    }
    threads
}

/// The frame to blame for a hung call: of the first thread that ran a call (`rpc_thrift`'s
/// `handle_call` on its stack), the innermost frame outside the standard library and
/// `rpc_thrift`. The dump cannot say which thread ran which call, so with several busy
/// handler threads the first listed (the most recently started thread) is named.
pub fn blame(threads: &[Thread]) -> Option<&Frame> {
    threads
        .iter()
        .filter(|t| t.is_handler())
        .find_map(Thread::culprit)
}

/// `Thread 0x... (most recent call first):` or `Current thread 0x... (...):`.
fn thread_header(line: &str) -> Option<Thread> {
    let line = line.trim_end();
    let (current, rest) = if let Some(rest) = line.strip_prefix("Current thread ") {
        (true, rest)
    } else {
        (false, line.strip_prefix("Thread ")?)
    };
    let (id, tail) = rest.split_once(' ')?;
    if !id.starts_with("0x") || !tail.starts_with("(most recent call first)") {
        return None;
    }
    Some(Thread {
        id: id.to_owned(),
        current,
        frames: Vec::new(),
    })
}

/// `  File "<file>", line <n> in <function>`.
fn frame_line(line: &str) -> Option<Frame> {
    let rest = line.trim_start().strip_prefix("File \"")?;
    let (file, rest) = rest.rsplit_once("\", line ")?;
    let (number, function) = rest.trim_end().split_once(" in ")?;
    Some(Frame {
        file: file.to_owned(),
        line: number.parse().ok()?,
        function: function.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const DUMP: &str = r#"2026-12-06 worker log line that is not part of the dump
Thread 0x00007f0c297fb6c0 (most recent call first):
  <no Python frame>

Thread 0x00007f0c2a7fc6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/usr/lib/python3.11/threading.py", line 622 in wait
  File "/srv/app/handlers.py", line 12 in sleep_ms
  File "/srv/app/gen-py/echo/Echo.py", line 301 in process_sleep_ms
  File "/usr/lib/python3/dist-packages/thrift/TMultiplexedProcessor.py", line 52 in process
  File "/usr/local/lib/python3.11/dist-packages/rpc_thrift/worker.py", line 88 in handle_call

Current thread 0x00007f0c2b9c4740 (most recent call first):
  File "/usr/local/lib/python3.11/dist-packages/rpc_thrift/worker.py", line 240 in run
  File "/srv/app/worker.py", line 30 in <module>
"#;

    #[test]
    fn threads_and_frames_are_read() {
        let threads = parse(&lines(DUMP));
        assert_eq!(threads.len(), 3);
        assert!(threads[0].frames.is_empty());
        assert_eq!(threads[1].id, "0x00007f0c2a7fc6c0");
        assert_eq!(threads[1].frames.len(), 6);
        assert_eq!(
            threads[1].frames[2],
            Frame {
                file: "/srv/app/handlers.py".into(),
                line: 12,
                function: "sleep_ms".into()
            }
        );
        assert!(threads[2].current);
        assert_eq!(threads[2].frames[1].function, "<module>");
    }

    #[test]
    fn blame_names_the_handler_not_the_stdlib_or_the_main_thread() {
        let threads = parse(&lines(DUMP));
        assert_eq!(
            blame(&threads).unwrap().describe(),
            "/srv/app/handlers.py:12 in sleep_ms"
        );
    }

    #[test]
    fn no_handler_thread_no_blame() {
        let dump = "Current thread 0x1 (most recent call first):\n  File \"/x/rpc_thrift/worker.py\", line 9 in run\n  File \"/srv/w.py\", line 3 in <module>\n";
        assert_eq!(blame(&parse(&lines(dump))), None);
        assert_eq!(blame(&parse(&[])), None);
    }

    #[test]
    fn stdlib_and_package_paths() {
        let frame = |file: &str| Frame {
            file: file.into(),
            line: 1,
            function: "f".into(),
        };
        assert!(frame("/usr/lib/python3.11/re/_compiler.py").is_stdlib());
        assert!(frame("/opt/py/lib/python3.12/threading.py").is_stdlib());
        assert!(frame("<frozen importlib._bootstrap>").is_stdlib());
        assert!(!frame("/usr/lib/python3/dist-packages/thrift/x.py").is_stdlib());
        assert!(!frame("/venv/lib/python3.11/site-packages/app/x.py").is_stdlib());
        assert!(!frame("/srv/python-apps/x.py").is_stdlib());
        assert!(frame("/venv/lib/python3.11/site-packages/rpc_thrift/worker.py").is_rpc_thrift());
    }

    #[test]
    fn a_frame_stuck_in_c_with_a_file_name_containing_spaces() {
        let dump = "Thread 0x2 (most recent call first):\n  File \"/srv/my app/h.py\", line 7 in spin\n  File \"/x/rpc_thrift/worker.py\", line 1 in handle_call\n";
        assert_eq!(
            blame(&parse(&lines(dump))).unwrap().describe(),
            "/srv/my app/h.py:7 in spin"
        );
    }
}
