package docgen

import (
	"flag"
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
