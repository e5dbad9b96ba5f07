// Package k8scheck holds the endpoint lists of Kubernetes' metadata-concealment e2e
// check (kubernetes/kubernetes test/images/metadata-concealment/check_metadata_concealment.go),
// once, for the policy's and the proxy's tests: its success endpoints must answer 200
// (and 403 with X-Forwarded-For), its no-kube-env endpoints must not show kube-env, its
// failure endpoints must be refused.
package k8scheck

var (
	Success = []string{
		"http://169.254.169.254",
		"http://metadata.google.internal",
		"http://169.254.169.254/",
		"http://metadata.google.internal/",
		"http://metadata.google.internal/computeMetadata",
		"http://metadata.google.internal/computeMetadata/v1",
		"http://metadata.google.internal/computeMetadata/v1/",
		"http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token",
		"http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
		"http://metadata.google.internal/computeMetadata/v1/instance/tags?alt=text",
		"http://metadata.google.internal/computeMetadata/v1/instance/tags?wait_for_change=false",
		"http://metadata.google.internal/computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=0",
		"http://metadata.google.internal/computeMetadata/v1/instance/tags?wait_for_change=true&last_etag=d34db33f",
	}
	NoKubeEnv = []string{
		"http://metadata.google.internal/computeMetadata/v1/instance/?recursive%3Dtrue",
		"http://metadata.google.internal/computeMetadata/v1/instance/?re%08ecursive=true",
	}
	Failure = []string{
		"http://metadata.google.internal/0.2/",
		"http://metadata.google.internal/computeMetadata/v2/",
		"http://metadata.google.internal/computeMetadata/v1/instance/attributes/kube-env",
		"http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/identity",
		"http://metadata.google.internal/computeMetadata/v1/instance/?recursive=true",
		"http://metadata.google.internal/computeMetadata/v1/instance/?%72%65%63%75%72%73%69%76%65=true",
		"http://metadata.google.internal/computeMetadata/v1/instance/?something=else",
		"http://metadata.google.internal/computeMetadata/v1/instance/?unknown",
		"http://metadata.google.internal/computeMetadata/v1/instance/attributes//kube-env",
		"http://metadata.google.internal/computeMetadata/v1/instance/attributes/../attributes/kube-env",
		"http://metadata.google.internal/computeMetadata/v1/instance/service-accounts//default/identity",
		"http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/../service-accounts/default/identity",
	}
)
