package kubeapi

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"
)

// Apply creates the objects of a manifest file (the kinds conf/deploy's RBAC and
// optional policy use), in namespace ns when they are namespaced and name none.
func Apply(t testing.TB, client kubernetes.Interface, path, ns string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for doc := range strings.SplitSeq(string(data), "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var head struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if err := create(ctx, client, head.Kind, []byte(doc), ns); err != nil {
			t.Fatalf("%s: %s: %v", path, head.Kind, err)
		}
	}
}

func create(ctx context.Context, c kubernetes.Interface, kind string, doc []byte, ns string) error {
	opts := metav1.CreateOptions{}
	decode := func(into any) error { return yaml.UnmarshalStrict(doc, into) }
	switch kind {
	case "Namespace":
		var o corev1.Namespace
		if err := decode(&o); err != nil {
			return err
		}
		_, err := c.CoreV1().Namespaces().Create(ctx, &o, opts)
		return err
	case "ServiceAccount":
		var o corev1.ServiceAccount
		if err := decode(&o); err != nil {
			return err
		}
		if o.Namespace == "" {
			o.Namespace = ns
		}
		_, err := c.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, &o, opts)
		return err
	case "ClusterRole":
		var o rbacv1.ClusterRole
		if err := decode(&o); err != nil {
			return err
		}
		_, err := c.RbacV1().ClusterRoles().Create(ctx, &o, opts)
		return err
	case "ClusterRoleBinding":
		var o rbacv1.ClusterRoleBinding
		if err := decode(&o); err != nil {
			return err
		}
		_, err := c.RbacV1().ClusterRoleBindings().Create(ctx, &o, opts)
		return err
	case "ValidatingAdmissionPolicy":
		var o admissionv1.ValidatingAdmissionPolicy
		if err := decode(&o); err != nil {
			return err
		}
		_, err := c.AdmissionregistrationV1().ValidatingAdmissionPolicies().Create(ctx, &o, opts)
		return err
	case "ValidatingAdmissionPolicyBinding":
		var o admissionv1.ValidatingAdmissionPolicyBinding
		if err := decode(&o); err != nil {
			return err
		}
		_, err := c.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Create(ctx, &o, opts)
		return err
	}
	return fmt.Errorf("kind %s not supported by kubeapi.Apply", kind)
}
