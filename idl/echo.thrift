// echo.thrift: the test and demo service of rpc_proxy.
//
// Who speaks it: the end-to-end tests and the demo (Python clients generated with
// `thrift --gen py`, and tests/e2e/echo_server.py as the backend), and later the Rust
// benchmark (`thrift --gen rs`). Clients talk to rpc_proxy with the framed transport and the
// strict binary protocol, multiplexed as service `echo` (TMultiplexedProtocol: the message
// name travels as `echo:<method>`). The proxy strips `echo:` before forwarding, so backends
// serve the plain, non-multiplexed processor.

exception EchoError {
  1: string message,
  2: i32 code,
}

service Echo {
  /** Returns `s` unchanged. */
  string echo(1: string s) throws (1: EchoError err),

  /** Does nothing; a round trip with empty arguments and an empty result. */
  void ping(),

  /** Returns `a + b`. */
  i32 add(1: i32 a, 2: i32 b),

  /** Sleeps `ms` milliseconds, then returns `s`. */
  string slow(1: i32 ms, 2: string s),

  /** Returns the name the backend was started with. */
  string whoami(),

  /** Returns `data` unchanged. */
  binary blob(1: binary data),

  /** One-way: no reply. The backend records `s` in its log. */
  oneway void notify(1: string s),

  /** Raises EchoError when `how` is "declared", an undeclared exception otherwise. */
  string fail(1: string how) throws (1: EchoError err),
}
