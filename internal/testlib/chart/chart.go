// Package chart runs the pinned helm binary (tools/helm, `make helm` puts it in
// bin/tools/helm) on charts/metaconceal for the tests: rendering, linting, and the one
// definition of how conf/deploy is rendered from the chart (Deploy).
package chart

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testutil"
)

// Name is the chart's name and its dir under charts/.
const Name = "metaconceal"

// Tool returns the path of a binary of `make helm` / `make promtool` (bin/tools/name);
// the test fails, saying how to build it, when it is missing.
func Tool(t testing.TB, name string) string {
	t.Helper()
	bin, err := testutil.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(bin, "tools", name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s: %v (build it with `make %s`)", p, err, name)
	}
	return p
}

// Dir is charts/metaconceal in this repository.
func Dir(t testing.TB) string {
	t.Helper()
	root, err := testutil.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "charts", Name)
}

// Helm runs helm with args and returns stdout; the error carries stderr.
func Helm(t testing.TB, args ...string) (string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(Tool(t, "helm"), args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// No user config, cache or repositories: only the chart on disk.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CONFIG_HOME="+home, "HELM_CACHE_HOME="+home, "HELM_DATA_HOME="+home)
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Template renders the chart as release "metaconceal" in namespace with extra args
// (--set, -f, --show-only, ...).
func Template(t testing.TB, namespace string, args ...string) (string, error) {
	t.Helper()
	return Helm(t, append([]string{"template", Name, Dir(t), "--namespace", namespace}, args...)...)
}

// Split parses `helm template` output into the documents of each template, keyed by
// the template's path in the chart (templates/daemonset.yaml), each document without
// helm's "# Source:" line.
func Split(out string) (map[string][]string, error) {
	docs := map[string][]string{}
	for doc := range strings.SplitSeq("\n"+out, "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		head, body, _ := strings.Cut(doc, "\n")
		src, ok := strings.CutPrefix(head, "# Source: "+Name+"/")
		if !ok {
			return nil, fmt.Errorf("a document without a # Source line: %q", head)
		}
		docs[src] = append(docs[src], strings.TrimRight(body, "\n")+"\n")
	}
	return docs, nil
}

// GeneratedHeader starts every file of conf/deploy that Deploy renders.
const GeneratedHeader = "# Generated from charts/metaconceal by `make manifests`: edit the chart, not this file.\n"

// deployRender is one `helm template` call of Deploy: the namespace, the values and
// which template goes to which file of conf/deploy.
type deployRender struct {
	namespace string
	set       []string
	files     map[string]string // template path in the chart -> file under conf/deploy
}

// deployRenders is how conf/deploy comes from the chart's default values: the install
// (with its Namespace object, which Helm users create beforehand), the optional
// own-node policy, and the cleanup of the uninstall.
var deployRenders = []deployRender{
	{namespace: "metaconceal-system", set: []string{"namespace.create=true"}, files: map[string]string{
		"templates/namespace.yaml":      "namespace.yaml",
		"templates/serviceaccount.yaml": "serviceaccount.yaml",
		"templates/rbac.yaml":           "rbac.yaml",
		"templates/daemonset.yaml":      "daemonset.yaml",
	}},
	{namespace: "metaconceal-system", set: []string{"ownNodePolicy.enabled=true"}, files: map[string]string{
		"templates/own-node-policy.yaml": "optional/own-node-policy.yaml",
	}},
	{namespace: "metaconceal-uninstall", set: []string{"cleanup=true", "namespace.create=true"}, files: map[string]string{
		"templates/namespace.yaml":         "uninstall/namespace.yaml",
		"templates/cleanup-daemonset.yaml": "uninstall/daemonset.yaml",
	}},
}

// Deploy renders the files of conf/deploy from the chart: file path (relative to
// conf/deploy) -> content. The kustomization.yaml files are not rendered.
func Deploy(t testing.TB) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for _, r := range deployRenders {
		args := []string{}
		for _, s := range r.set {
			args = append(args, "--set", s)
		}
		var tmpls []string
		for tmpl := range r.files {
			tmpls = append(tmpls, tmpl)
		}
		sort.Strings(tmpls)
		for _, tmpl := range tmpls {
			args = append(args, "--show-only", tmpl)
		}
		out, err := Template(t, r.namespace, args...)
		if err != nil {
			t.Fatal(err)
		}
		docs, err := Split(out)
		if err != nil {
			t.Fatal(err)
		}
		for _, tmpl := range tmpls {
			if len(docs[tmpl]) == 0 {
				t.Fatalf("%s renders nothing with %v", tmpl, r.set)
			}
			files[r.files[tmpl]] = []byte(GeneratedHeader + strings.Join(docs[tmpl], "---\n"))
		}
	}
	return files
}
