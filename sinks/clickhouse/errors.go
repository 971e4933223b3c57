package chsink

import (
	"errors"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// PermanentError marks a failure caused by the data itself (a record that
// cannot be decoded, a row the server or the driver refuses): retrying the
// same data cannot succeed.
type PermanentError struct {
	// Field is the offending field as a path, when known
	// ("samples[3].event_time_ms").
	Field string
	Err   error
}

func (e *PermanentError) Error() string { return e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

func permanent(field string, err error) error { return &PermanentError{Field: field, Err: err} }

// Server exception codes that mean "this data is refused": retrying the same
// rows fails the same way, so the sink isolates the records that carry them
// and dead-letters those. Codes from ClickHouse's ErrorCodes.cpp.
var dataErrorCodes = map[int32]string{
	6:   "CANNOT_PARSE_TEXT",
	27:  "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
	38:  "CANNOT_PARSE_DATE",
	41:  "CANNOT_PARSE_DATETIME",
	53:  "TYPE_MISMATCH",
	69:  "ARGUMENT_OUT_OF_BOUND",
	70:  "CANNOT_CONVERT_TYPE",
	72:  "CANNOT_PARSE_NUMBER",
	117: "INCORRECT_DATA",
	128: "TOO_LARGE_ARRAY_SIZE",
	131: "TOO_LARGE_STRING_SIZE",
	190: "SIZES_OF_ARRAYS_DOESNT_MATCH",
	321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
	395: "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO",
	469: "VIOLATED_CONSTRAINT",
}

// IsRetriable reports whether an operation that failed with err may succeed
// if tried again unchanged: network failures, timeouts, a server that is
// overloaded, read-only, restarting, missing the table for a moment (a
// migration or a RENAME in progress) or refusing the user for a moment.
//
// Only errors caused by the data are permanent: a *PermanentError, and
// server exceptions whose code says the data was refused (parse, type,
// range, constraint errors). Any other server exception is treated as
// retriable, so an operational fault never sends good data to the dead-letter
// topic; the sink logs every retry with the server's code, so a partition
// that keeps failing is visible. A cancelled parent context is neither: the
// caller checks its context first.
func IsRetriable(err error) bool {
	if err == nil {
		return false
	}
	var pe *PermanentError
	if errors.As(err, &pe) {
		return false
	}
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		_, data := dataErrorCodes[ex.Code]
		return !data
	}
	// Everything else (network errors, timeouts, a connection torn down
	// mid-batch, driver.ErrBadConn, clickhouse.ErrAcquireConnTimeout) says
	// nothing about the data: data problems are caught as PermanentError
	// when rows are built and appended.
	return true
}
