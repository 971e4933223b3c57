// Package export writes a trained model (detectors/model/train) as an ONNX
// model that ONNX Runtime (≥ 1.12, tested with 1.24) runs and whose output
// equals the trainer's Predict within float32 rounding.
//
// The graph takes one input, float32 [N, F] with a dynamic N, and gives one
// output, float32 [N, 2]: column 0 is 1 - P(positive), column 1 is
// P(positive), as the model manifest's output contract (index 1) says.
//   - GBT: ai.onnx.ml TreeEnsembleRegressor (opset 3; BRANCH_LEQ nodes with
//     float32 thresholds, one target, SUM aggregation in float32, base value
//     = the initial log-odds) → Cast to double → Sigmoid → Cast to float →
//     [1 - p, p].
//   - logistic regression: Cast to double → MatMul (weights [F, 1]) → Add
//     (bias) → Sigmoid → Cast to float → [1 - p, p]. The weights are the
//     trainer's float32 weights (standardisation folded in), widened; the
//     dot product runs in double so large raw inputs lose no precision.
//
// The sigmoid runs in double because ONNX Runtime's float32 Sigmoid is a
// fast approximation (errors near 1e-7); in double both sides agree to the
// last float32 bit in practice.
//
// Written with the Go types generated from the vendored onnx-ml.proto
// (detectors/model/onnxpb); ONNX has no Go writer to reuse.
package export

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"

	"github.com/vigilhealth/vigil/detectors/model/onnxpb"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"google.golang.org/protobuf/proto"
)

// Versions written into every model: IR 8 with the default opset 17 and
// ai.onnx.ml opset 3 (ONNX 1.12), which every ONNX Runtime since 1.12 loads.
const (
	IRVersion   = 8
	Opset       = 17
	MLOpset     = 3
	MLDomain    = "ai.onnx.ml"
	DefaultIn   = "input"
	DefaultOut  = "probabilities"
	producer    = "vigil-train"
	marginName  = "margin"
	marginD     = "margin_f64"
	inputD      = "input_f64"
	posD        = "p_positive_f64"
	posName     = "p_positive"
	negName     = "p_negative"
	oneName     = "one"
	weightsName = "weights"
	biasName    = "bias"
)

// Options name the graph's input and output and add metadata.
type Options struct {
	// InputName is the graph input (default "input").
	InputName string
	// OutputName is the [N, 2] probability output (default "probabilities").
	OutputName string
	// GraphName names the graph (default "vigil_model").
	GraphName string
	// ProducerVersion is recorded as producer_version.
	ProducerVersion string
	// Doc is the model's doc_string.
	Doc string
	// Metadata are key/value pairs stored in metadata_props, written in key
	// order.
	Metadata map[string]string
}

// Marshal encodes m as ONNX model bytes. It only reads m.
func Marshal(m *train.Model, o Options) ([]byte, error) {
	mp, err := Build(m, o)
	if err != nil {
		return nil, err
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(mp)
	if err != nil {
		return nil, fmt.Errorf("encoding ONNX model: %w", err)
	}
	return b, nil
}

// Build returns the ONNX ModelProto for m.
func Build(m *train.Model, o Options) (*onnxpb.ModelProto, error) {
	if m == nil || m.NFeatures < 1 {
		return nil, errors.New("exporting model: no model or no features")
	}
	if o.InputName == "" {
		o.InputName = DefaultIn
	}
	if o.OutputName == "" {
		o.OutputName = DefaultOut
	}
	if o.GraphName == "" {
		o.GraphName = "vigil_model"
	}
	g := &onnxpb.GraphProto{Name: proto.String(o.GraphName)}
	opsets := []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(Opset)}}
	switch m.Algorithm {
	case train.GBT:
		n, err := treeNode(m, o.InputName)
		if err != nil {
			return nil, err
		}
		g.Node = append(g.Node, n, cast(marginName, marginD, onnxpb.TensorProto_DOUBLE))
		opsets = append(opsets, &onnxpb.OperatorSetIdProto{Domain: proto.String(MLDomain), Version: proto.Int64(MLOpset)})
	case train.LogReg:
		if len(m.Weights) != m.NFeatures {
			return nil, fmt.Errorf("exporting logistic regression: %d weights for %d features", len(m.Weights), m.NFeatures)
		}
		w := make([]float64, len(m.Weights))
		for i, v := range m.Weights {
			w[i] = float64(v)
		}
		g.Initializer = append(g.Initializer,
			doubleTensor(weightsName, []int64{int64(m.NFeatures), 1}, w),
			doubleTensor(biasName, []int64{1}, []float64{float64(m.Bias)}))
		g.Node = append(g.Node,
			cast(o.InputName, inputD, onnxpb.TensorProto_DOUBLE),
			node("MatMul", "", []string{inputD, weightsName}, []string{"logit_raw"}),
			node("Add", "", []string{"logit_raw", biasName}, []string{marginD}))
	default:
		return nil, fmt.Errorf("exporting model: unknown algorithm %q", m.Algorithm)
	}
	g.Initializer = append(g.Initializer, floatTensor(oneName, nil, []float32{1}))
	concat := node("Concat", "", []string{negName, posName}, []string{o.OutputName})
	concat.Attribute = []*onnxpb.AttributeProto{attrInt("axis", 1)}
	g.Node = append(g.Node,
		node("Sigmoid", "", []string{marginD}, []string{posD}),
		cast(posD, posName, onnxpb.TensorProto_FLOAT),
		node("Sub", "", []string{oneName, posName}, []string{negName}),
		concat)
	g.Input = []*onnxpb.ValueInfoProto{valueInfo(o.InputName, int64(m.NFeatures))}
	g.Output = []*onnxpb.ValueInfoProto{valueInfo(o.OutputName, 2)}

	mp := &onnxpb.ModelProto{
		IrVersion:       proto.Int64(IRVersion),
		OpsetImport:     opsets,
		ProducerName:    proto.String(producer),
		ProducerVersion: proto.String(o.ProducerVersion),
		ModelVersion:    proto.Int64(1),
		DocString:       proto.String(o.Doc),
		Graph:           g,
	}
	for _, k := range slices.Sorted(maps.Keys(o.Metadata)) {
		mp.MetadataProps = append(mp.MetadataProps, &onnxpb.StringStringEntryProto{Key: proto.String(k), Value: proto.String(o.Metadata[k])})
	}
	return mp, nil
}

// treeNode encodes the trees as one TreeEnsembleRegressor node with output
// "margin" [N, 1] = Base + sum of leaf values.
func treeNode(m *train.Model, input string) (*onnxpb.NodeProto, error) {
	var (
		treeIDs, nodeIDs, featIDs, trueIDs, falseIDs []int64
		modes                                        [][]byte
		values                                       []float32
		tTree, tNode, tID                            []int64
		tW                                           []float32
	)
	leaf, branch := []byte("LEAF"), []byte("BRANCH_LEQ")
	for t, tr := range m.Trees {
		if len(tr.Nodes) == 0 {
			return nil, fmt.Errorf("exporting trees: tree %d has no nodes", t)
		}
		for i, nd := range tr.Nodes {
			treeIDs = append(treeIDs, int64(t))
			nodeIDs = append(nodeIDs, int64(i))
			if nd.Left < 0 {
				featIDs = append(featIDs, 0)
				modes = append(modes, leaf)
				values = append(values, 0)
				trueIDs = append(trueIDs, 0)
				falseIDs = append(falseIDs, 0)
				tTree = append(tTree, int64(t))
				tNode = append(tNode, int64(i))
				tID = append(tID, 0)
				tW = append(tW, nd.Value)
				continue
			}
			if int(nd.Feature) >= m.NFeatures || nd.Left >= int32(len(tr.Nodes)) || nd.Right >= int32(len(tr.Nodes)) || nd.Right < 0 {
				return nil, fmt.Errorf("exporting trees: tree %d node %d is malformed", t, i)
			}
			featIDs = append(featIDs, int64(nd.Feature))
			modes = append(modes, branch)
			values = append(values, nd.Threshold)
			trueIDs = append(trueIDs, int64(nd.Left))
			falseIDs = append(falseIDs, int64(nd.Right))
		}
	}
	n := node("TreeEnsembleRegressor", MLDomain, []string{input}, []string{marginName})
	n.Attribute = []*onnxpb.AttributeProto{
		attrString("aggregate_function", "SUM"),
		attrFloats("base_values", []float32{m.Base}),
		attrInt("n_targets", 1),
		attrInts("nodes_falsenodeids", falseIDs),
		attrInts("nodes_featureids", featIDs),
		attrStrings("nodes_modes", modes),
		attrInts("nodes_nodeids", nodeIDs),
		attrInts("nodes_treeids", treeIDs),
		attrInts("nodes_truenodeids", trueIDs),
		attrFloats("nodes_values", values),
		attrString("post_transform", "NONE"),
		attrInts("target_ids", tID),
		attrInts("target_nodeids", tNode),
		attrInts("target_treeids", tTree),
		attrFloats("target_weights", tW),
	}
	return n, nil
}

func node(op, domain string, in, out []string) *onnxpb.NodeProto {
	n := &onnxpb.NodeProto{OpType: proto.String(op), Input: in, Output: out, Name: proto.String(out[0] + "_" + op)}
	if domain != "" {
		n.Domain = proto.String(domain)
	}
	return n
}

func cast(in, out string, to onnxpb.TensorProto_DataType) *onnxpb.NodeProto {
	n := node("Cast", "", []string{in}, []string{out})
	n.Attribute = []*onnxpb.AttributeProto{attrInt("to", int64(to))}
	return n
}

func valueInfo(name string, cols int64) *onnxpb.ValueInfoProto {
	return &onnxpb.ValueInfoProto{
		Name: proto.String(name),
		Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{
			ElemType: proto.Int32(int32(onnxpb.TensorProto_FLOAT)),
			Shape: &onnxpb.TensorShapeProto{Dim: []*onnxpb.TensorShapeProto_Dimension{
				{Value: &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: "N"}},
				{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: cols}},
			}},
		}}},
	}
}

// floatTensor is a float32 initializer stored as little-endian raw_data.
func floatTensor(name string, dims []int64, v []float32) *onnxpb.TensorProto {
	raw := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(f))
	}
	return &onnxpb.TensorProto{Name: proto.String(name), Dims: dims, DataType: proto.Int32(int32(onnxpb.TensorProto_FLOAT)), RawData: raw}
}

// doubleTensor is a float64 initializer stored as little-endian raw_data.
func doubleTensor(name string, dims []int64, v []float64) *onnxpb.TensorProto {
	raw := make([]byte, 8*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint64(raw[8*i:], math.Float64bits(f))
	}
	return &onnxpb.TensorProto{Name: proto.String(name), Dims: dims, DataType: proto.Int32(int32(onnxpb.TensorProto_DOUBLE)), RawData: raw}
}

func attrInt(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

func attrInts(name string, v []int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: v}
}

func attrFloats(name string, v []float32) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_FLOATS.Enum(), Floats: v}
}

func attrString(name, v string) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_STRING.Enum(), S: []byte(v)}
}

func attrStrings(name string, v [][]byte) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_STRINGS.Enum(), Strings: v}
}
