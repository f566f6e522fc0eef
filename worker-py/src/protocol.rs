//! The worker side of the LB <-> worker protocol, as pure decisions: what a frame from the LB
//! means in each phase of a connection, when a connection must close, and the reconnect
//! backoff. (The HELLO message the worker sends first is [`rpc_frame::Hello`], shared with
//! the LB that decodes it.) No sockets, threads or Python here: the
//! engine ([`crate::engine`]) feeds it events and acts on the answers, and the unit tests below
//! drive it with fake clocks.
//!
//! Wire reference: CONTRACT section 2 (types 20-23), section 6 (graceful stop) and section 9
//! (LB supervision: the address from the environment, the worker's own pings).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rpc_frame::MessageType;

/// Where the LB listens for workers (its `back_address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket path (the address has no `:`).
    Unix(PathBuf),
    /// `host:port` (the address has a `:`).
    Tcp(String),
}

// === impl Address ===

impl Address {
    /// Parses a `back_address`: `host:port` when it contains `:`, a unix socket path otherwise.
    ///
    /// # Errors
    /// A message naming the problem if the address is empty.
    pub fn parse(address: &str) -> Result<Self, String> {
        let address = address.trim();
        if address.is_empty() {
            return Err("the LB address is empty".to_owned());
        }
        if address.contains(':') {
            Ok(Self::Tcp(address.to_owned()))
        } else {
            Ok(Self::Unix(PathBuf::from(address)))
        }
    }
}

/// The environment variable an LB sets to its `back_address` for the workers it starts
/// (CONTRACT section 9, LB supervision); read when no address is given.
pub const ADDRESS_ENV: &str = "RPC_LB_BACK_ADDRESS";

/// The environment variable with a supervised worker's slot (0-based).
pub const WORKER_ID_ENV: &str = "RPC_WORKER_ID";

/// The environment variable with a supervised worker's generation (the LB's rolling-restart
/// count, 0-based).
pub const WORKER_GENERATION_ENV: &str = "RPC_WORKER_GENERATION";

impl Address {
    /// The address to dial: `explicit` when given (an explicit address wins), else `from_env`
    /// (the value of [`ADDRESS_ENV`]).
    ///
    /// # Errors
    /// A message naming both the argument and the variable when neither gives an address
    /// (missing, empty or blank), or when the variable is not valid UTF-8.
    pub fn from_arg_or_env(
        explicit: Option<&str>,
        from_env: Option<&OsStr>,
    ) -> Result<Self, String> {
        if let Some(address) = explicit {
            return Self::parse(address).map_err(|_| {
                format!(
                    "the LB address is empty: pass a non-empty `address`, or address=None to read ${ADDRESS_ENV}"
                )
            });
        }
        let Some(value) = from_env else {
            return Err(format!(
                "no LB address: pass `address` or set ${ADDRESS_ENV} (an LB that starts its workers sets it)"
            ));
        };
        let Some(value) = value.to_str() else {
            return Err(format!(
                "no LB address: ${ADDRESS_ENV} is not valid UTF-8; pass `address` instead"
            ));
        };
        Self::parse(value).map_err(|_| {
            format!("no LB address: `address` is None and ${ADDRESS_ENV} is empty; pass `address` or set ${ADDRESS_ENV}")
        })
    }
}

/// A supervised worker's number from the environment (`RPC_WORKER_ID`,
/// `RPC_WORKER_GENERATION`): `None` when unset or not a non-negative integer.
pub fn env_number(value: Option<&OsStr>) -> Option<u64> {
    value?.to_str()?.trim().parse().ok()
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp(host_port) => f.write_str(host_port),
        }
    }
}

/// The durations that drive a connection's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// The worker pings an LB that sent no heartbeat for this long (twice this once the LB
    /// has pinged on its own), and pings it at most this often.
    pub heartbeat_interval: Duration,
    /// No frame at all from the LB for this long, once a heartbeat came from it (its ping,
    /// or the echo of the worker's): the connection is dead.
    pub heartbeat_timeout: Duration,
    /// How long a stopping worker waits for STOP_CONFIRM (old LBs never send it).
    pub confirm_wait: Duration,
    /// Longest wait for held calls once a stop or an LB shutdown began.
    pub stop_grace: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(1000),
            heartbeat_timeout: Duration::from_millis(6000),
            confirm_wait: Duration::from_millis(1500),
            stop_grace: Duration::from_millis(15_000),
        }
    }
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Normal service.
    Serving,
    /// The worker sent STOP at `since`; `confirmed` once STOP_CONFIRM arrived.
    Stopping {
        /// When STOP was sent.
        since: Instant,
        /// STOP_CONFIRM arrived: the LB sends nothing new.
        confirmed: bool,
    },
    /// The LB sent a STOP_CONFIRM the worker did not ask for at `since`: it is shutting down.
    /// Held calls finish, then the worker reconnects.
    Draining {
        /// When the unsolicited STOP_CONFIRM arrived.
        since: Instant,
    },
}

/// What to do with one frame from the LB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// CALL or ONEWAY: hand it to a pool thread.
    Dispatch,
    /// HEARTBEAT from the LB: write the frame back unchanged, at once.
    Echo,
    /// The LB's echo of one of the worker's own pings: proof of life, never echoed back (two
    /// echoers would ping-pong forever).
    PingAnswered,
    /// The STOP_CONFIRM answering our STOP.
    StopConfirmed,
    /// An unsolicited STOP_CONFIRM: the LB is shutting down, nothing new is coming.
    LbShuttingDown,
    /// Anything else (replies, unknown types, a repeated STOP_CONFIRM): log and carry on.
    Ignore,
}

/// How a connection ended, which decides what the engine does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The worker stopped itself: return from `run()`.
    Stopped,
    /// The LB went away or the connection broke: back off, then connect again.
    Reconnect,
}

/// Why a connection must close now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Stopping: every held call is answered and STOP was confirmed (or the wait for it ran
    /// out). Close gracefully, then stop.
    Stopped,
    /// Draining after an unsolicited STOP_CONFIRM: every held call is answered. Close
    /// gracefully, then reconnect.
    Drained,
    /// Stopping or draining for longer than the stop grace with calls still held.
    GraceOverrun {
        /// Calls still held.
        held: usize,
        /// What comes next.
        end: End,
    },
    /// A heartbeat came from the LB once, then nothing arrived for the heartbeat timeout.
    HeartbeatTimeout {
        /// What comes next.
        end: End,
    },
}

impl Close {
    /// What the engine does after closing.
    pub fn end(self) -> End {
        match self {
            Self::Stopped => End::Stopped,
            Self::Drained => End::Reconnect,
            Self::GraceOverrun { end, .. } | Self::HeartbeatTimeout { end } => end,
        }
    }

    /// Whether the connection can be closed gracefully (everything written was answered).
    pub fn is_graceful(self) -> bool {
        matches!(self, Self::Stopped | Self::Drained)
    }
}

/// The state of one LB connection, driven by frames, the stop request and the clock.
///
/// # Heartbeats
/// - The worker echoes the LB's pings unchanged ([`Action::Echo`]).
/// - It pings the LB itself, `("ping", 20, seqid)` with seqids -1, -2, ... (negative: the Go
///   original LB numbers its calls from 1 and takes any heartbeat's seqid for a pending call's,
///   so a positive one could steal a call's reply), when no heartbeat came from the LB for a
///   heartbeat interval (two once the LB has pinged on its own, so an LB pinging at the same
///   cadence is not pinged back), at most once per interval, in every phase. Only heartbeats
///   count, not calls: the Go original LB at HEAD never pings (it never writes its pings) and
///   drops a worker after 6 s without a heartbeat *from* it ("Worker HB timeout"), however
///   busy the connection; it never echoes a worker's ping either, but counts it.
/// - A heartbeat from the LB (its ping, or the echo of one of ours, [`Action::PingAnswered`])
///   arms the heartbeat timeout: from then on, silence for that long drops the connection.
///   An LB that never sends a heartbeat (the Go original) is never timed out: the worker
///   stays connected until EOF.
#[derive(Debug, Clone)]
pub struct ConnState {
    /// Where the connection stands.
    phase: Phase,
    /// A heartbeat (the LB's ping, or the echo of ours) arrived: the heartbeat timeout is
    /// armed (the original LB at HEAD sends neither, and its workers must not flap).
    armed: bool,
    /// The LB pinged on its own at least once.
    lb_pings: bool,
    /// When the last frame of any type arrived (or the connection opened).
    last_frame: Instant,
    /// When the last heartbeat from the LB arrived (or the connection opened).
    last_heartbeat: Instant,
    /// When the worker last pinged the LB (or the connection opened).
    last_ping: Instant,
    /// Pings the worker sent on this connection.
    pings_sent: u64,
    /// The durations in force.
    timings: Timings,
}

// === impl ConnState ===

impl ConnState {
    /// A connection that just opened at `now`.
    pub fn new(now: Instant, timings: Timings) -> Self {
        Self {
            phase: Phase::Serving,
            armed: false,
            lb_pings: false,
            last_frame: now,
            last_heartbeat: now,
            last_ping: now,
            pings_sent: 0,
            timings,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the heartbeat timeout is armed.
    pub fn armed(&self) -> bool {
        self.armed
    }

    /// Pings the worker sent on this connection.
    pub fn pings_sent(&self) -> u64 {
        self.pings_sent
    }

    /// Whether a heartbeat with `seqid` is the echo of a ping this worker sent.
    fn is_own_ping(&self, seqid: i32) -> bool {
        seqid < 0 && u64::from(seqid.unsigned_abs()) <= self.pings_sent
    }

    /// A frame of `message_type` with `seqid` arrived at `now`: what to do with it.
    pub fn on_frame(&mut self, message_type: MessageType, seqid: i32, now: Instant) -> Action {
        self.last_frame = now;
        match message_type {
            MessageType::Call | MessageType::Oneway => Action::Dispatch,
            MessageType::Heartbeat => {
                self.armed = true;
                self.last_heartbeat = now;
                if self.is_own_ping(seqid) {
                    Action::PingAnswered
                } else {
                    self.lb_pings = true;
                    Action::Echo
                }
            }
            MessageType::StopConfirm => match self.phase {
                Phase::Serving => {
                    self.phase = Phase::Draining { since: now };
                    Action::LbShuttingDown
                }
                Phase::Stopping {
                    since,
                    confirmed: false,
                } => {
                    self.phase = Phase::Stopping {
                        since,
                        confirmed: true,
                    };
                    Action::StopConfirmed
                }
                Phase::Stopping {
                    confirmed: true, ..
                }
                | Phase::Draining { .. } => Action::Ignore,
            },
            _ => Action::Ignore,
        }
    }

    /// Whether the worker must ping the LB at `now`; if so, the seqid of that ping (counted
    /// as sent).
    pub fn ping_due(&mut self, now: Instant) -> Option<i32> {
        let interval = self.timings.heartbeat_interval;
        let silence = if self.lb_pings {
            interval.saturating_mul(2)
        } else {
            interval
        };
        if now.duration_since(self.last_heartbeat) < silence
            || now.duration_since(self.last_ping) < interval
        {
            return None;
        }
        self.last_ping = now;
        // -1, -2, ..., i32::MIN, then -1 again (after 2^31 pings every negative seqid counts
        // as our own).
        let n = i32::try_from(self.pings_sent % (1 << 31)).unwrap_or(i32::MAX);
        self.pings_sent += 1;
        Some(-n - 1)
    }

    /// The worker was asked to stop. Returns `true` if STOP must be sent now (the first
    /// time); the stop grace starts at `now`.
    pub fn begin_stop(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Stopping { .. } => false,
            Phase::Serving | Phase::Draining { .. } => {
                self.phase = Phase::Stopping {
                    since: now,
                    confirmed: false,
                };
                true
            }
        }
    }

    /// Whether the connection must close at `now`, with `held` calls dispatched and not yet
    /// answered (a call counts as held until its reply is written to the socket).
    pub fn poll(&self, now: Instant, held: usize) -> Option<Close> {
        let grace = self.timings.stop_grace;
        match self.phase {
            Phase::Serving => {}
            Phase::Stopping { since, confirmed } => {
                let confirm_over =
                    confirmed || now.duration_since(since) >= self.timings.confirm_wait;
                if held == 0 && confirm_over {
                    return Some(Close::Stopped);
                }
                if now.duration_since(since) >= grace {
                    return Some(Close::GraceOverrun {
                        held,
                        end: End::Stopped,
                    });
                }
            }
            Phase::Draining { since } => {
                if held == 0 {
                    return Some(Close::Drained);
                }
                if now.duration_since(since) >= grace {
                    return Some(Close::GraceOverrun {
                        held,
                        end: End::Reconnect,
                    });
                }
            }
        }
        if self.armed && now.duration_since(self.last_frame) > self.timings.heartbeat_timeout {
            return Some(Close::HeartbeatTimeout {
                end: self.on_lost(),
            });
        }
        None
    }

    /// The connection was lost (EOF, I/O error, a frame that cannot be a message): what next.
    pub fn on_lost(&self) -> End {
        match self.phase {
            Phase::Stopping { .. } => End::Stopped,
            Phase::Serving | Phase::Draining { .. } => End::Reconnect,
        }
    }
}

/// Jittered exponential backoff between connection attempts: each delay is drawn from
/// `[base / 2, base]`, and `base` doubles from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First base delay, and the base after [`Backoff::reset`].
    min: Duration,
    /// Largest base delay.
    max: Duration,
    /// The base of the next delay.
    base: Duration,
    /// xorshift64 state; never 0.
    rng: u64,
}

// === impl Backoff ===

impl Backoff {
    /// A backoff from `min` doubling to `max`, with jitter drawn from `seed`.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max: max.max(min),
            base: min,
            rng: seed | 1,
        }
    }

    /// The next delay to wait; doubles the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (self.base * 2).min(self.max);
        let half = base / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            self.next_random() % (spread + 1)
        };
        half + Duration::from_micros(jitter)
    }

    /// Starts over from `min` (after a connection that lived a while).
    pub fn reset(&mut self) {
        self.base = self.min;
    }

    /// xorshift64: good enough to spread reconnects of many workers.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_frame::{Hello, Message, decode_frame};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timings() -> Timings {
        Timings {
            heartbeat_interval: ms(1000),
            heartbeat_timeout: ms(6000),
            confirm_wait: ms(1500),
            stop_grace: ms(15_000),
        }
    }

    // --- address ---

    #[test]
    fn address_kinds() {
        assert_eq!(
            Address::parse("/tmp/lb.sock"),
            Ok(Address::Unix("/tmp/lb.sock".into()))
        );
        assert_eq!(
            Address::parse(" 127.0.0.1:5555 "),
            Ok(Address::Tcp("127.0.0.1:5555".into()))
        );
        assert_eq!(Address::parse("lb.sock").unwrap().to_string(), "lb.sock");
        assert!(Address::parse("  ").is_err());
    }

    #[test]
    fn address_from_argument_or_environment() {
        let env = Some(OsStr::new("/run/lb.sock"));
        // An explicit address wins over the environment.
        assert_eq!(
            Address::from_arg_or_env(Some("127.0.0.1:9"), env),
            Ok(Address::Tcp("127.0.0.1:9".into()))
        );
        assert_eq!(
            Address::from_arg_or_env(None, env),
            Ok(Address::Unix("/run/lb.sock".into()))
        );
        for (explicit, env) in [
            (None, None),
            (None, Some(OsStr::new(""))),
            (None, Some(OsStr::new("  "))),
            (Some(" "), env),
        ] {
            let err = Address::from_arg_or_env(explicit, env).unwrap_err();
            assert!(
                err.contains("`address`") && err.contains(ADDRESS_ENV),
                "{err}"
            );
        }
        assert!(
            Address::from_arg_or_env(Some(""), None)
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn supervision_numbers() {
        assert_eq!(env_number(Some(OsStr::new("3"))), Some(3));
        assert_eq!(env_number(Some(OsStr::new(" 0\n"))), Some(0));
        assert_eq!(env_number(Some(OsStr::new("-1"))), None);
        assert_eq!(env_number(Some(OsStr::new("x"))), None);
        assert_eq!(env_number(None), None);
    }

    // --- hello ---

    #[test]
    fn hello_exact_bytes() {
        let hello = Hello {
            pool_size: 4,
            pid: 0x0102_0304,
            service: "echo".into(),
        };
        let mut wire = hello.encode();
        let frame = decode_frame(&mut wire, 1 << 20).unwrap().unwrap();
        assert!(wire.is_empty());
        let message = Message::parse(frame).unwrap();
        assert_eq!(message.message_type(), MessageType::Hello);
        assert_eq!(message.name(), "hello");
        assert_eq!(message.seqid(), 0);
        assert_eq!(
            message.body(),
            &[
                8, 0, 1, 0, 0, 0, 4, 8, 0, 2, 1, 2, 3, 4, 11, 0, 3, 0, 0, 0, 4, b'e', b'c', b'h',
                b'o', 0
            ]
        );
    }

    #[test]
    fn hello_round_trip() {
        for service in ["", "echo", "sérvice with spaces"] {
            for (pool_size, pid) in [(1, 1), (64, 4_194_304), (i32::MAX, i32::MIN)] {
                let hello = Hello {
                    pool_size,
                    pid,
                    service: service.into(),
                };
                let message = Message::parse(hello.encode()).unwrap();
                assert_eq!(Hello::decode(message.body()), Some(hello));
            }
        }
    }

    // --- frame decisions ---

    #[test]
    fn serving_decisions() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        assert_eq!(state.on_frame(MessageType::Call, 0, t0), Action::Dispatch);
        assert_eq!(state.on_frame(MessageType::Oneway, 0, t0), Action::Dispatch);
        for ignored in [2, 3, 5, 19, 21, 23, 24, 255] {
            assert_eq!(
                state.on_frame(MessageType::from_u8(ignored), 0, t0),
                Action::Ignore,
                "type {ignored}"
            );
        }
        assert!(!state.armed());
        assert_eq!(state.on_frame(MessageType::Heartbeat, 0, t0), Action::Echo);
        assert!(state.armed());
        assert_eq!(state.phase(), Phase::Serving);
        assert_eq!(state.poll(t0 + ms(100), 3), None);
    }

    #[test]
    fn heartbeat_timeout_only_once_pinged() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        // An old LB never pings: silence is fine.
        assert_eq!(state.poll(t0 + ms(60_000), 0), None);
        state.on_frame(MessageType::Heartbeat, 0, t0 + ms(60_000));
        assert_eq!(state.poll(t0 + ms(66_000), 0), None);
        assert_eq!(
            state.poll(t0 + ms(66_001), 0),
            Some(Close::HeartbeatTimeout {
                end: End::Reconnect
            })
        );
        // Any frame keeps the connection alive, not only pings.
        state.on_frame(MessageType::Call, 0, t0 + ms(66_000));
        assert_eq!(state.poll(t0 + ms(72_000), 1), None);
    }

    #[test]
    fn stop_with_confirm() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        assert!(state.begin_stop(t0));
        assert!(!state.begin_stop(t0 + ms(10)), "STOP is sent once");
        // Calls sent before the LB processed STOP still run.
        assert_eq!(
            state.on_frame(MessageType::Call, 0, t0 + ms(5)),
            Action::Dispatch
        );
        assert_eq!(
            state.on_frame(MessageType::Heartbeat, 0, t0 + ms(5)),
            Action::Echo
        );
        assert_eq!(state.poll(t0 + ms(10), 0), None, "waits for the confirm");
        assert_eq!(
            state.on_frame(MessageType::StopConfirm, 0, t0 + ms(20)),
            Action::StopConfirmed
        );
        assert_eq!(
            state.on_frame(MessageType::StopConfirm, 0, t0 + ms(21)),
            Action::Ignore
        );
        assert_eq!(state.poll(t0 + ms(30), 2), None, "two calls held");
        assert_eq!(state.poll(t0 + ms(40), 0), Some(Close::Stopped));
        assert!(Close::Stopped.is_graceful());
        assert_eq!(Close::Stopped.end(), End::Stopped);
    }

    #[test]
    fn stop_without_confirm_waits_briefly() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        state.begin_stop(t0);
        assert_eq!(state.poll(t0 + ms(1499), 0), None);
        assert_eq!(state.poll(t0 + ms(1500), 0), Some(Close::Stopped));
        // Held calls keep it open up to the grace, then it gives up.
        assert_eq!(state.poll(t0 + ms(14_999), 1), None);
        assert_eq!(
            state.poll(t0 + ms(15_000), 1),
            Some(Close::GraceOverrun {
                held: 1,
                end: End::Stopped
            })
        );
        assert_eq!(state.on_lost(), End::Stopped);
    }

    #[test]
    fn unsolicited_confirm_drains_then_reconnects() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        assert_eq!(
            state.on_frame(MessageType::StopConfirm, 0, t0),
            Action::LbShuttingDown
        );
        assert_eq!(state.phase(), Phase::Draining { since: t0 });
        assert_eq!(
            state.on_frame(MessageType::StopConfirm, 0, t0),
            Action::Ignore
        );
        assert_eq!(state.poll(t0 + ms(10), 1), None);
        assert_eq!(state.poll(t0 + ms(20), 0), Some(Close::Drained));
        assert_eq!(Close::Drained.end(), End::Reconnect);
        assert_eq!(
            state.poll(t0 + ms(15_000), 1),
            Some(Close::GraceOverrun {
                held: 1,
                end: End::Reconnect
            })
        );
        assert_eq!(state.on_lost(), End::Reconnect);
        // Asked to stop while draining: STOP goes out and the worker stops for good.
        assert!(state.begin_stop(t0 + ms(30)));
        assert_eq!(state.on_lost(), End::Stopped);
    }

    #[test]
    fn heartbeat_timeout_while_stopping_stops() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        state.on_frame(MessageType::Heartbeat, 0, t0);
        state.begin_stop(t0);
        assert_eq!(
            state.poll(t0 + ms(6001), 1),
            Some(Close::HeartbeatTimeout { end: End::Stopped })
        );
    }

    // --- the worker's own pings ---

    #[test]
    fn an_lb_that_never_sends_a_heartbeat_is_pinged_every_interval_and_kept() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        assert_eq!(state.ping_due(t0 + ms(999)), None);
        assert_eq!(state.ping_due(t0 + ms(1000)), Some(-1));
        assert_eq!(
            state.ping_due(t0 + ms(1500)),
            None,
            "at most one per interval"
        );
        assert_eq!(state.ping_due(t0 + ms(2000)), Some(-2));
        // Calls are no heartbeat: the Go LB still wants pings from a busy worker.
        assert_eq!(
            state.on_frame(MessageType::Call, 5, t0 + ms(2500)),
            Action::Dispatch
        );
        assert_eq!(state.ping_due(t0 + ms(3000)), Some(-3));
        assert_eq!(state.pings_sent(), 3);
        // Pings go out while stopping too (the Go LB would drop the held calls).
        state.begin_stop(t0 + ms(3100));
        assert_eq!(state.ping_due(t0 + ms(4000)), Some(-4));
        // Never armed: no heartbeat ever came back.
        assert!(!state.armed());
        let fresh = ConnState::new(t0, timings());
        assert_eq!(fresh.poll(t0 + ms(600_000), 0), None);
    }

    #[test]
    fn echoes_of_own_pings_arm_the_timeout_and_are_not_echoed_back() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        assert_eq!(state.ping_due(t0 + ms(1000)), Some(-1));
        assert_eq!(
            state.on_frame(MessageType::Heartbeat, -1, t0 + ms(1010)),
            Action::PingAnswered
        );
        assert!(state.armed());
        // The next ping counts from the echo.
        assert_eq!(state.ping_due(t0 + ms(2009)), None);
        assert_eq!(state.ping_due(t0 + ms(2010)), Some(-2));
        assert_eq!(
            state.on_frame(MessageType::Heartbeat, -2, t0 + ms(2020)),
            Action::PingAnswered
        );
        // An LB that echoes keeps the connection; one that stops answering loses it.
        assert_eq!(state.poll(t0 + ms(8020), 0), None);
        assert_eq!(
            state.poll(t0 + ms(8021), 0),
            Some(Close::HeartbeatTimeout {
                end: End::Reconnect
            })
        );
        // A negative seqid the worker never sent is the LB's own ping: echoed.
        assert_eq!(
            state.on_frame(MessageType::Heartbeat, -3, t0 + ms(2030)),
            Action::Echo
        );
    }

    #[test]
    fn an_lb_that_pings_is_pinged_only_after_two_silent_intervals() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        assert_eq!(
            state.on_frame(MessageType::Heartbeat, 0, t0 + ms(900)),
            Action::Echo
        );
        // Its next ping is a little late: not pinged back.
        assert_eq!(state.ping_due(t0 + ms(2100)), None);
        state.on_frame(MessageType::Heartbeat, 0, t0 + ms(2150));
        assert_eq!(state.ping_due(t0 + ms(4149)), None);
        // Silent for two intervals: pinged.
        assert_eq!(state.ping_due(t0 + ms(4150)), Some(-1));
        assert_eq!(state.ping_due(t0 + ms(4500)), None);
    }

    #[test]
    fn ping_seqids_wrap_within_the_negatives() {
        let t0 = Instant::now();
        let mut state = ConnState::new(t0, timings());
        state.pings_sent = (1 << 31) - 1;
        assert_eq!(state.ping_due(t0 + ms(1000)), Some(i32::MIN));
        assert_eq!(state.ping_due(t0 + ms(2000)), Some(-1));
        assert!(state.is_own_ping(-12345) && state.is_own_ping(i32::MIN));
        assert!(!state.is_own_ping(0) && !state.is_own_ping(1));
    }

    // --- backoff ---

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut backoff = Backoff::new(ms(100), ms(5000), 42);
        let bases = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for base in bases {
            let delay = backoff.next_delay();
            assert!(
                delay >= ms(base) / 2 && delay <= ms(base),
                "{delay:?} for base {base}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= ms(100));
    }

    #[test]
    fn backoff_jitter_spreads() {
        let mut delays = std::collections::HashSet::new();
        for seed in 0..20 {
            let mut backoff = Backoff::new(ms(1000), ms(1000), seed * 7919);
            delays.insert(backoff.next_delay());
        }
        assert!(delays.len() > 10, "jitter spreads reconnects: {delays:?}");
    }

    #[test]
    fn backoff_zero_is_fine() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO, 0);
        assert_eq!(backoff.next_delay(), Duration::ZERO);
    }
}
