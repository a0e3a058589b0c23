package console

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	promql "github.com/prometheus/prometheus/promql/parser"
)

// moduleRoot is the folder holding go.mod above the test's directory.
func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = parent
	}
}

// exportedMetrics reads, from the module's Go source, the name of every
// metric made with prometheus.New*: the first argument of NewDesc, or the
// Namespace/Subsystem/Name of the *Opts literal the constructor gets. A
// constructor whose name it cannot read fails the test, so the list cannot
// silently miss a metric. Histograms and summaries add their series.
func exportedMetrics(t *testing.T, root string) map[string]string {
	t.Helper()
	names := map[string]string{} // series name -> where it is defined
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		promName := ""
		for _, imp := range f.Imports {
			if imp.Path.Value == `"github.com/prometheus/client_golang/prometheus"` {
				promName = "prometheus"
				if imp.Name != nil {
					promName = imp.Name.Name
				}
			}
		}
		if promName == "" {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if x, ok := sel.X.(*ast.Ident); !ok || x.Name != promName || !strings.HasPrefix(sel.Sel.Name, "New") ||
				strings.HasSuffix(sel.Sel.Name, "Registry") {
				return true
			}
			where := rel + ":" + strconv.Itoa(fset.Position(call.Pos()).Line)
			name, kind := metricName(promName, sel.Sel.Name, call)
			if name == "" {
				t.Errorf("%s: cannot read the metric name of %s.%s (use a string literal so the dashboard test can check it)", where, promName, sel.Sel.Name)
				return true
			}
			series := []string{name}
			switch kind {
			case "Histogram":
				series = append(series, name+"_bucket", name+"_sum", name+"_count")
			case "Summary":
				series = append(series, name+"_sum", name+"_count")
			}
			for _, s := range series {
				names[s] = where
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// metricName returns the metric a prometheus.NewX call defines and its kind
// (Counter, Gauge, Histogram, Summary, or "" for a Desc).
func metricName(pkg, fn string, call *ast.CallExpr) (string, string) {
	if len(call.Args) == 0 {
		return "", ""
	}
	str := func(e ast.Expr) string {
		if lit, ok := e.(*ast.BasicLit); ok && lit.Kind == token.STRING {
			s, _ := strconv.Unquote(lit.Value)
			return s
		}
		return ""
	}
	if fn == "NewDesc" {
		return str(call.Args[0]), ""
	}
	lit, ok := call.Args[0].(*ast.CompositeLit)
	if !ok {
		return "", ""
	}
	typ, ok := lit.Type.(*ast.SelectorExpr)
	if !ok || typ.X.(*ast.Ident).Name != pkg || !strings.HasSuffix(typ.Sel.Name, "Opts") {
		return "", ""
	}
	var parts = map[string]string{}
	for _, e := range lit.Elts {
		if kv, ok := e.(*ast.KeyValueExpr); ok {
			if k, ok := kv.Key.(*ast.Ident); ok {
				parts[k.Name] = str(kv.Value)
			}
		}
	}
	if parts["Name"] == "" {
		return "", ""
	}
	var full []string
	for _, k := range []string{"Namespace", "Subsystem", "Name"} {
		if parts[k] != "" {
			full = append(full, parts[k])
		}
	}
	return strings.Join(full, "_"), strings.TrimSuffix(typ.Sel.Name, "Opts")
}

type dashboardPanel struct {
	Title   string `json:"title"`
	Type    string `json:"type"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []dashboardPanel `json:"panels"`
}

// grafanaVars are Grafana's interval variables, replaced by a duration
// before parsing (the only variables the dashboard uses in queries).
var grafanaVars = regexp.MustCompile(`\$__(rate_interval|interval|range)\b`)

func TestGrafanaDashboardQueriesNameExportedMetrics(t *testing.T) {
	root := moduleRoot(t)
	exported := exportedMetrics(t, root)
	files := map[string]bool{}
	for _, where := range exported {
		files[where[:strings.Index(where, ":")]] = true
	}
	// The servers and the agents both export metrics; fewer files means the
	// scan lost track of one of them.
	if len(files) < 2 {
		t.Fatalf("found metrics in %d files only: %v", len(files), exported)
	}

	b, err := os.ReadFile(filepath.Join(root, "docs", "grafana", "ferry.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string           `json:"title"`
		UID    string           `json:"uid"`
		Panels []dashboardPanel `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("docs/grafana/ferry.json: %v", err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Fatal("the dashboard needs a title and a uid")
	}
	used := map[string]bool{}
	exprs := 0
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" || p.Type == "text" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				exprs++
				q := grafanaVars.ReplaceAllString(tg.Expr, "5m")
				if strings.Contains(q, "$") {
					t.Errorf("panel %q: %q uses a variable the test does not know", p.Title, tg.Expr)
					continue
				}
				expr, err := promql.NewParser(promql.Options{}).ParseExpr(q)
				if err != nil {
					t.Errorf("panel %q: %q: %v", p.Title, tg.Expr, err)
					continue
				}
				n := 0
				promql.Inspect(expr, func(node promql.Node, _ []promql.Node) error {
					vs, ok := node.(*promql.VectorSelector)
					if !ok {
						return nil
					}
					n++
					name := vs.Name
					for _, m := range vs.LabelMatchers {
						if m.Name == "__name__" {
							name = m.Value
						}
					}
					used[name] = true
					if _, ok := exported[name]; !ok {
						t.Errorf("panel %q: metric %q is not one ferry exports (exported: %v)", p.Title, name, slices.Sorted(maps.Keys(exported)))
					}
					return nil
				})
				if n == 0 {
					t.Errorf("panel %q: %q selects no metric", p.Title, tg.Expr)
				}
			}
		}
	}
	walk(dash.Panels)
	if exprs == 0 {
		t.Fatal("the dashboard has no queries")
	}
	// The topics on-call asked for are there.
	for _, want := range []string{"ferry_migrations", "ferry_migrations_stalled", "ferry_agent_stalls_total",
		"ferry_agent_hydration_bytes_per_second", "ferry_agent_downtime_seconds_bucket", "ferry_raft_applied_index", "ferry_raft_leader",
		"ferry_raft_apply_seconds_bucket"} {
		if !used[want] {
			t.Errorf("no panel queries %s", want)
		}
	}
}
