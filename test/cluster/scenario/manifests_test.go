package scenario

import "testing"

// The builders must give exactly the manifests the scenarios wrote out by hand before.
func TestProbeManifests(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, got, want string
	}{
		{"preexisting", preexistingManifest, `apiVersion: v1
kind: Namespace
metadata:
  name: {{.Namespace}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: preexisting
  namespace: {{.Namespace}}
spec:
  replicas: 2
  selector:
    matchLabels: {app: preexisting}
  template:
    metadata:
      labels: {app: preexisting}
    spec:
      terminationGracePeriodSeconds: 2
      tolerations:
        - operator: Exists
      containers:
        - name: probe
          image: {{.ProbeImage}}
          imagePullPolicy: Never
          command: ["/probe", "idle"]
`},
		{"hostnet", hostNetworkManifest, `apiVersion: v1
kind: Namespace
metadata:
  name: {{.WorkloadNamespace}}
---
apiVersion: v1
kind: Pod
metadata:
  name: hostnet
  namespace: {{.WorkloadNamespace}}
  labels: {app: hostnet}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 2
  containers:
    - name: probe
      image: {{.ProbeImage}}
      imagePullPolicy: Never
      command: ["/probe", "idle"]
`},
		{"prober", proberManifest, `apiVersion: v1
kind: Namespace
metadata:
  name: {{.WorkloadNamespace}}
---
apiVersion: v1
kind: Pod
metadata:
  name: prober
  namespace: {{.WorkloadNamespace}}
  labels: {app: prober}
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: probe
      image: {{.ProbeImage}}
      imagePullPolicy: Never
      command: ["/probe", "loop", "-interval", "100ms", "{{.URL}}"]
`},
	} {
		if tc.got != tc.want {
			t.Errorf("%s manifest:\n%s\nwant:\n%s", tc.name, tc.got, tc.want)
		}
	}
}
