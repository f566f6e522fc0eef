// The IDL of the worked example (examples/calculator/README.md).
//
// `thrift --gen py calculator.thrift` writes gen-py/calculator/: the Calculator service module
// (Client, Processor, Iface) and ttypes (DivideByZero). Nothing generated is kept in the repo.

namespace py calculator

exception DivideByZero {
    1: string message
}

service Calculator {
    i32 add(1: i32 a, 2: i32 b),
    double divide(1: double a, 2: double b) throws (1: DivideByZero e),
    // Which worker process answered: shows the LB spreading calls over the workers.
    i32 pid(),
}
