package hl7

import (
	"strconv"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/ingest/validate"
)

// Header is what Vigil reads from MSH.
type Header struct {
	SendingApp, SendingFacility     string
	ReceivingApp, ReceivingFacility string
	// TimeRaw is MSH-7 as sent.
	TimeRaw []byte
	// Type, Trigger and Structure are MSH-9.1, .2 and .3 (e.g. ORU, R01,
	// ORU_R01).
	Type, Trigger, Structure string
	// ControlID is MSH-10, echoed in MSA-2.
	ControlID string
	// ProcessingID is MSH-11.1 (P, T, D).
	ProcessingID string
	// Version is MSH-12.1 (e.g. "2.5.1").
	Version string
}

// ReadHeader reads the header of m.
func ReadHeader(m *Message) Header {
	msh := m.MSH()
	return Header{
		SendingApp:        hdName(msh.Field(3)),
		SendingFacility:   hdName(msh.Field(4)),
		ReceivingApp:      hdName(msh.Field(5)),
		ReceivingFacility: hdName(msh.Field(6)),
		TimeRaw:           msh.Field(7).Component(1).Raw(),
		Type:              strings.ToUpper(msh.Field(9).Component(1).String()),
		Trigger:           strings.ToUpper(msh.Field(9).Component(2).String()),
		Structure:         msh.Field(9).Component(3).String(),
		ControlID:         msh.Field(10).String(),
		ProcessingID:      msh.Field(11).Component(1).String(),
		Version:           msh.Field(12).Component(1).String(),
	}
}

// hdName reads an HD (namespace id ^ universal id ^ type): the namespace id,
// else the universal id.
func hdName(f Field) string {
	if s := f.Component(1).String(); s != "" {
		return s
	}
	return f.Component(2).String()
}

// SupportedVersion reports whether v is an HL7 v2 version Vigil takes:
// 2.3 to 2.8 (with their point releases such as 2.3.1, 2.5.1, 2.8.2).
func SupportedVersion(v string) bool {
	for _, p := range []string{"2.3", "2.4", "2.5", "2.6", "2.7", "2.8"} {
		if v == p || strings.HasPrefix(v, p+".") {
			return true
		}
	}
	return false
}

// Acknowledgment codes of MSA-1 (original mode).
const (
	// AA: accepted; what Vigil took is durable in Kafka.
	AA = "AA"
	// AE: not accepted for a reason that may pass (Kafka unavailable,
	// shutting down): send the message again.
	AE = "AE"
	// AR: refused for good (malformed, unsupported): do not resend as is.
	AR = "AR"
)

// Severity of an ERR segment (ERR-4, HL7 table 0516).
const (
	SeverityError   = "E"
	SeverityWarning = "W"
	SeverityInfo    = "I"
)

// Issue is one problem found in a message, located for an ERR segment
// (ERR-2: segment id ^ occurrence ^ field position) and for a dead letter
// (Path: "OBX[3]-5").
type Issue struct {
	Segment  string
	Sequence int
	Field    int
	// Code is the HL7 table 0357 error code (ERR-3).
	Code string
	// Severity is E, W or I (ERR-4).
	Severity string
	// Reason is Vigil's machine-readable refusal reason.
	Reason validate.Reason
	// Message is a sentence for a human (ERR-8).
	Message string
}

// Path locates the issue as "OBX[3]-5" ("PID-3" for the first and only
// occurrence of a segment other than OBX, OBR).
func (i Issue) Path() string {
	if i.Segment == "" {
		if i.Sequence > 0 {
			// A segment whose id could not be read.
			return "segment[" + strconv.Itoa(i.Sequence) + "]"
		}
		return ""
	}
	var b strings.Builder
	b.WriteString(i.Segment)
	if i.Sequence > 0 && (i.Sequence > 1 || i.Segment == "OBX" || i.Segment == "OBR") {
		b.WriteByte('[')
		b.WriteString(strconv.Itoa(i.Sequence))
		b.WriteByte(']')
	}
	if i.Field > 0 {
		b.WriteByte('-')
		b.WriteString(strconv.Itoa(i.Field))
	}
	return b.String()
}

// IssueFromParse converts a parse error into an Issue (reason
// malformed_message, severity E).
func IssueFromParse(e *ParseError) Issue {
	return Issue{Segment: e.Segment, Sequence: e.Sequence, Field: e.Field, Code: e.Code, Severity: SeverityError,
		Reason: validate.MalformedMessage, Message: e.Message}
}

// MaxAckErrors bounds the ERR segments of one ACK; the count of the others
// is given in the last one.
const MaxAckErrors = 20

// BuildACK appends to dst an original-mode ACK (MSH, MSA, ERR...) answering
// h: MSA-1 code, MSA-2 = h.ControlID, MSA-3 the first issue's text (for
// v2.3/2.4 receivers, which have no ERR-8), and one ERR per issue (ERR-2
// location, ERR-3 code, ERR-4 severity, ERR-8 message), at most
// MaxAckErrors. The ACK uses the standard delimiters |^~\& and \r segment
// separators, answers from the receiving application and facility of h to
// its sender, and carries h's processing id and version (2.5.1 when h has
// none, as for a message that could not be parsed). controlID is the ACK's
// own MSH-10.
func BuildACK(dst []byte, h Header, code string, issues []Issue, now time.Time, controlID string) []byte {
	d := &DefaultDelims
	ver := h.Version
	if ver == "" {
		ver = "2.5.1"
	}
	proc := h.ProcessingID
	if proc == "" {
		proc = "P"
	}
	dst = append(dst, "MSH|^~\\&|"...)
	dst = Escape(dst, h.ReceivingApp, d)
	dst = append(dst, '|')
	dst = Escape(dst, h.ReceivingFacility, d)
	dst = append(dst, '|')
	dst = Escape(dst, h.SendingApp, d)
	dst = append(dst, '|')
	dst = Escape(dst, h.SendingFacility, d)
	dst = append(dst, '|')
	dst = append(dst, FormatTime(now)...)
	dst = append(dst, "||ACK"...)
	if h.Trigger != "" {
		dst = append(dst, '^')
		dst = Escape(dst, h.Trigger, d)
		dst = append(dst, "^ACK"...)
	}
	dst = append(dst, '|')
	dst = Escape(dst, controlID, d)
	dst = append(dst, '|')
	dst = Escape(dst, proc, d)
	dst = append(dst, '|')
	dst = Escape(dst, ver, d)
	dst = append(dst, "\rMSA|"...)
	dst = append(dst, code...)
	dst = append(dst, '|')
	dst = Escape(dst, h.ControlID, d)
	if len(issues) > 0 {
		dst = append(dst, '|')
		dst = Escape(dst, clipText(issues[0].Message, 80), d)
	}
	for n, is := range issues {
		if n == MaxAckErrors {
			dst = append(dst, "\rERR||||I||||"...)
			dst = Escape(dst, strconv.Itoa(len(issues)-n)+" more errors not listed", d)
			break
		}
		dst = append(dst, "\rERR||"...)
		if is.Segment != "" || is.Sequence > 0 {
			// A segment whose id could not be read is located by its
			// position alone ("^7").
			dst = Escape(dst, is.Segment, d)
			dst = append(dst, '^')
			if is.Sequence > 0 {
				dst = strconv.AppendInt(dst, int64(is.Sequence), 10)
			}
			if is.Field > 0 {
				dst = append(dst, '^')
				dst = strconv.AppendInt(dst, int64(is.Field), 10)
			}
		}
		dst = append(dst, '|')
		c := is.Code
		if c == "" {
			c = CodeInternalError
		}
		dst = append(dst, c...)
		dst = append(dst, '^')
		dst = append(dst, codeText(c)...)
		dst = append(dst, "^HL70357|"...)
		sev := is.Severity
		if sev == "" {
			sev = SeverityError
		}
		dst = append(dst, sev...)
		dst = append(dst, '|')
		if is.Reason != "" {
			dst = Escape(dst, string(is.Reason), d)
			dst = append(dst, "^^VIGIL"...)
		}
		dst = append(dst, "|||"...)
		msg := is.Message
		if p := is.Path(); p != "" {
			msg = p + ": " + msg
		}
		dst = Escape(dst, clipText(msg, 512), d)
	}
	return append(dst, '\r')
}

func codeText(c string) string {
	switch c {
	case CodeSegmentSequence:
		return "Segment sequence error"
	case CodeRequiredMissing:
		return "Required field missing"
	case CodeDataType:
		return "Data type error"
	case CodeTableValue:
		return "Table value not found"
	case CodeUnsupportedType:
		return "Unsupported message type"
	case CodeUnsupportedEvent:
		return "Unsupported event code"
	case CodeUnsupportedProcID:
		return "Unsupported processing id"
	case CodeUnsupportedVersion:
		return "Unsupported version id"
	case CodeUnknownKey:
		return "Unknown key identifier"
	case CodeDuplicateKey:
		return "Duplicate key identifier"
	default:
		return "Application internal error"
	}
}

func clipText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
