package docgen

import (
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the generated part of docs/architecture.md")

// TestArchitectureGraph keeps the package graph in docs/architecture.md
// equal to `go list`: moving or adding a package, or an import between
// ferry's packages, fails here until the doc is regenerated.
func TestArchitectureGraph(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	readSources(t, root)
	module, pkgs, err := ListPackages(root)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, "docs", "architecture.md")
	doc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want, err := Replace(string(doc), PackageGraph(module, pkgs))
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if string(doc) != want {
		t.Fatal("the package graph in docs/architecture.md differs from `go list`: regenerate with `go test ./internal/docgen -update`")
	}
}

// readSources reads every Go file and folder of the module. `go list` runs in
// a child process, whose reads the test cache does not see; reading them
// here makes any change to the sources or the folders rerun this test
// instead of reusing a cached pass.
func readSources(t *testing.T, root string) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && p != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".go") || d.Name() == "go.mod") {
			_, err = os.ReadFile(p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestListPackagesSeesThisModule(t *testing.T) {
	module, pkgs, err := ListPackages("../..")
	if err != nil {
		t.Fatal(err)
	}
	if module != "github.com/ferry-dev/ferry" {
		t.Fatalf("module %q", module)
	}
	var self *Package
	for i := range pkgs {
		if pkgs[i].Path == "internal/docgen" {
			self = &pkgs[i]
		}
		if i > 0 && pkgs[i-1].Path >= pkgs[i].Path {
			t.Fatalf("packages not sorted: %s before %s", pkgs[i-1].Path, pkgs[i].Path)
		}
		for _, imp := range pkgs[i].Imports {
			if strings.Contains(imp, ".") && !strings.HasPrefix(imp, "internal") {
				t.Fatalf("%s lists %q, not one of ferry's packages", pkgs[i].Path, imp)
			}
		}
	}
	if self == nil || len(self.Imports) != 0 {
		t.Fatalf("internal/docgen: %+v; want it listed, importing none of ferry's packages", self)
	}
}

func TestPackageGraphAndReplace(t *testing.T) {
	g := PackageGraph("example.com/m", []Package{{Path: "a", Imports: []string{"b"}}, {Path: "b"}})
	for _, want := range []string{`p0["a"]`, "p0 --> p1", "| `a` | `b` |", "| `b` | — |"} {
		if !strings.Contains(g, want) {
			t.Fatalf("graph lacks %q:\n%s", want, g)
		}
	}
	doc := "intro\n" + BeginGraph + "\nold\n" + EndGraph + "\nrest\n"
	got, err := Replace(doc, "new\n")
	if err != nil || got != "intro\n"+BeginGraph+"\nnew\n"+EndGraph+"\nrest\n" {
		t.Fatalf("Replace = %q, %v", got, err)
	}
	if _, err := Replace("no markers", "x"); err == nil {
		t.Fatal("Replace without markers succeeded")
	}
}
