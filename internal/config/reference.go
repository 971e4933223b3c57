package config

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"reflect"
	"strings"
)

// Reference renders the configuration reference as a Markdown table (path,
// environment variable, default, meaning) from the doc comments of the
// Config struct in src (the text of config.go, followed by the texts of the
// package's other files that declare section types). README.md embeds it; a
// test keeps the two equal.
func Reference(src []byte, more ...[]byte) (string, error) {
	structs := map[string]*ast.StructType{}
	for i, text := range append([][]byte{src}, more...) {
		fset := token.NewFileSet()
		f, err := parser.ParseFile(fset, fmt.Sprintf("source %d", i), text, parser.ParseComments)
		if err != nil {
			return "", fmt.Errorf("parsing config source: %w", err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if ts, ok := n.(*ast.TypeSpec); ok {
				if st, ok := ts.Type.(*ast.StructType); ok {
					structs[ts.Name.Name] = st
				}
			}
			return true
		})
	}
	docs := map[string]string{}
	var walkDocs func(typeName, prefix string)
	walkDocs = func(typeName, prefix string) {
		st := structs[typeName]
		if st == nil {
			return
		}
		var pending string
		for _, fld := range st.Fields.List {
			doc := strings.Join(strings.Fields(fld.Doc.Text()), " ")
			if doc == "" && len(fld.Names) > 0 && strings.Contains(pending, fld.Names[0].Name) {
				// A field without its own comment shares the previous
				// field's when that comment names it ("RetryInitial and
				// RetryMax bound ...").
				doc = pending
			}
			pending = doc
			if fld.Tag == nil || len(fld.Names) == 0 {
				continue
			}
			tag := reflect.StructTag(strings.Trim(fld.Tag.Value, "`")).Get("yaml")
			tag = strings.Split(tag, ",")[0]
			p := tag
			if prefix != "" {
				p = prefix + "." + tag
			}
			if id, ok := fld.Type.(*ast.Ident); ok && structs[id.Name] != nil {
				walkDocs(id.Name, p)
				continue
			}
			docs[p] = doc
		}
	}
	walkDocs("Config", "")

	def := Default()
	var b strings.Builder
	b.WriteString("| setting | environment | default | meaning |\n|---|---|---|---|\n")
	var undocumented []string
	walk(reflect.ValueOf(&def).Elem(), "", func(p string, v reflect.Value) {
		if docs[p] == "" {
			undocumented = append(undocumented, p)
		}
		fmt.Fprintf(&b, "| `%s` | `%s` | %s | %s |\n", p, EnvName(p), defaultText(v), strings.ReplaceAll(docs[p], "|", "\\|"))
	})
	if len(undocumented) > 0 {
		return b.String(), fmt.Errorf("settings without a doc comment: %s", strings.Join(undocumented, ", "))
	}
	return b.String(), nil
}

func defaultText(v reflect.Value) string {
	switch {
	case v.Kind() == reflect.Slice && v.Len() == 0, v.Kind() == reflect.String && v.String() == "":
		return "(empty)"
	case v.Kind() == reflect.Slice:
		parts := make([]string, v.Len())
		for i := range parts {
			parts[i] = fmt.Sprint(v.Index(i).Interface())
		}
		return "`" + strings.Join(parts, ",") + "`"
	}
	return "`" + fmt.Sprint(v.Interface()) + "`"
}
