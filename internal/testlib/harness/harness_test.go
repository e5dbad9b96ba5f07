package harness

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const exampleConflist = `{
  "cniVersion": "1.1.0",
  "name": "shipped",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipMasq": true, "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}},
    {"type": "metaconceal", "mode": "SECURE", "proxy": "169.254.169.252:988"}
  ]
}`

func TestRewriteConflist(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      string
		opts    ConflistOptions
		wantErr string
		check   func(t *testing.T, list map[string]any)
	}{
		{
			name: "throwaway places set, shipped options kept",
			in:   exampleConflist,
			opts: ConflistOptions{Name: "n1", Bridge: "br9", Subnets: []string{"10.9.0.0/24", "fd00:9::/64"}, IPAMDir: "/tmp/ipam",
				StateDir: "/tmp/state", LogFile: "/tmp/log", Exclude: []string{"kube-system"}, CNIVersion: "1.0.0"},
			check: func(t *testing.T, list map[string]any) {
				plugins := list["plugins"].([]any)
				bridge := plugins[0].(map[string]any)
				ipam := bridge["ipam"].(map[string]any)
				mc := plugins[1].(map[string]any)
				got := map[string]any{
					"name": list["name"], "cniVersion": list["cniVersion"], "bridge": bridge["bridge"],
					"ipMasq": bridge["ipMasq"], "dataDir": ipam["dataDir"], "subnet-removed": ipam["subnet"] == nil,
					"stateDir": mc["stateDir"], "logFile": mc["logFile"], "mode": mc["mode"], "proxy": mc["proxy"],
				}
				want := map[string]any{
					"name": "n1", "cniVersion": "1.0.0", "bridge": "br9", "ipMasq": false, "dataDir": "/tmp/ipam",
					"subnet-removed": true, "stateDir": "/tmp/state", "logFile": "/tmp/log", "mode": "SECURE",
					"proxy": "169.254.169.252:988",
				}
				for k, w := range want {
					if got[k] != w {
						t.Errorf("%s: got %v, want %v", k, got[k], w)
					}
				}
				ranges, _ := json.Marshal(ipam["ranges"])
				if string(ranges) != `[[{"subnet":"10.9.0.0/24"}],[{"subnet":"fd00:9::/64"}]]` {
					t.Errorf("ranges: got %s", ranges)
				}
				routes, _ := json.Marshal(ipam["routes"])
				if string(routes) != `[{"dst":"0.0.0.0/0"},{"dst":"::/0"}]` {
					t.Errorf("routes: got %s", routes)
				}
				excl, _ := json.Marshal(mc["excludeNamespaces"])
				if string(excl) != `["kube-system"]` {
					t.Errorf("excludeNamespaces: got %s", excl)
				}
			},
		},
		{
			name: "empty options leave metaconceal's settings as shipped",
			in:   exampleConflist,
			check: func(t *testing.T, list map[string]any) {
				mc := list["plugins"].([]any)[1].(map[string]any)
				if _, ok := mc["stateDir"]; ok {
					t.Errorf("stateDir added though not asked for")
				}
				if list["cniVersion"] != "1.1.0" || list["name"] != "shipped" {
					t.Errorf("cniVersion/name changed: %v %v", list["cniVersion"], list["name"])
				}
			},
		},
		{name: "no metaconceal in the chain", in: `{"plugins":[{"type":"bridge"}]}`, wantErr: "no metaconceal"},
		{name: "no plugins list", in: `{"name":"x"}`, wantErr: "no plugins list"},
		{name: "not JSON", in: `{`, wantErr: "decode conflist"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			out, err := RewriteConflist([]byte(tt.in), tt.opts)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("want error containing %q, got %v", tt.wantErr, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var list map[string]any
			if err := json.Unmarshal(out, &list); err != nil {
				t.Fatalf("output is not JSON: %v", err)
			}
			tt.check(t, list)
		})
	}
}

func TestFindExampleConflist(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	files := map[string]string{
		"a-ptp.conflist":    `{"plugins":[{"type":"ptp","ipam":{"type":"host-local"}},{"type":"metaconceal"}]}`,
		"b-bridge.conflist": exampleConflist,
		"c-bridge.conflist": exampleConflist,
		"d-dual.conflist":   strings.Replace(exampleConflist, `"mode": "SECURE"`, `"metadataAddresses": ["169.254.169.254", "fd20:ce::254"]`, 1),
		"notes.json":        exampleConflist,
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		wantIPv6 bool
		want     string
	}{{false, "b-bridge.conflist"}, {true, "d-dual.conflist"}} {
		got, err := FindExampleConflist(dir, tt.wantIPv6)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(got) != tt.want {
			t.Errorf("wantIPv6=%v: got %s, want %s", tt.wantIPv6, got, tt.want)
		}
	}
	if _, err := FindExampleConflist(t.TempDir(), false); err == nil {
		t.Errorf("empty dir: want an error")
	}
}

func TestWritePauseArchive(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	bin := filepath.Join(dir, "pause-bin")
	if err := os.WriteFile(bin, []byte("\x7fELF not really"), 0o755); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "pause.tar")
	if err := WritePauseArchive(bin, archive, "localhost/x/pause:t"); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, mustRead(t, archive))
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(manifest) != 1 || len(manifest[0].Layers) != 1 || len(manifest[0].RepoTags) != 1 || manifest[0].RepoTags[0] != "localhost/x/pause:t" {
		t.Fatalf("manifest: %+v", manifest)
	}
	var config struct {
		OS     string `json:"os"`
		Config struct {
			Entrypoint []string
		} `json:"config"`
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	configData, ok := files[manifest[0].Config]
	if !ok {
		t.Fatalf("config %s not in the archive", manifest[0].Config)
	}
	if sum := sha256.Sum256(configData); hex.EncodeToString(sum[:])+".json" != manifest[0].Config {
		t.Errorf("config file name is not its digest")
	}
	if err := json.Unmarshal(configData, &config); err != nil {
		t.Fatal(err)
	}
	layer, ok := files[manifest[0].Layers[0]]
	if !ok {
		t.Fatalf("layer %s not in the archive", manifest[0].Layers[0])
	}
	sum := sha256.Sum256(layer)
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("diff_ids %v do not match the layer's sha256 %x", config.RootFS.DiffIDs, sum)
	}
	if config.OS != "linux" || strings.Join(config.Config.Entrypoint, " ") != "/pause" {
		t.Errorf("config: os %q entrypoint %v", config.OS, config.Config.Entrypoint)
	}
	layerFiles := readTar(t, layer)
	if string(layerFiles["pause"]) != "\x7fELF not really" {
		t.Errorf("layer does not hold the binary as /pause: %v", layerFiles)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func readTar(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		if hdr.Name == "pause" && hdr.Mode&0o111 == 0 {
			t.Errorf("pause is not executable in the layer: mode %o", hdr.Mode)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[hdr.Name] = body
	}
}
