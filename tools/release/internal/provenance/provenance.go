// Package provenance writes the release's in-toto Statement (v1) with a SLSA
// Provenance v1 predicate: the subjects (image index, platform manifests, SBOMs, chart)
// with their digests, the source commit, the build command, the toolchain and the
// Debian packages the images were built from.
package provenance

import (
	"encoding/json"
	"fmt"
	"os"
)

const (
	StatementType = "https://in-toto.io/Statement/v1"
	PredicateType = "https://slsa.dev/provenance/v1"
	// BuildType names this project's release procedure (docs/release.md).
	BuildType = "https://github.com/metaconceal/metaconceal/blob/main/docs/release.md#provenance"
	// SourceURI is the repository the commit is from.
	SourceURI = "git+https://github.com/metaconceal/metaconceal"
)

type Statement struct {
	Type          string    `json:"_type"`
	Subject       []Subject `json:"subject"`
	PredicateType string    `json:"predicateType"`
	Predicate     Predicate `json:"predicate"`
}

type Subject struct {
	Name   string            `json:"name"`
	Digest map[string]string `json:"digest"`
}

type Predicate struct {
	BuildDefinition BuildDefinition `json:"buildDefinition"`
	RunDetails      RunDetails      `json:"runDetails"`
}

type BuildDefinition struct {
	BuildType            string               `json:"buildType"`
	ExternalParameters   ExternalParameters   `json:"externalParameters"`
	InternalParameters   map[string]string    `json:"internalParameters"`
	ResolvedDependencies []ResourceDescriptor `json:"resolvedDependencies"`
}

type ExternalParameters struct {
	Version   string   `json:"version"`
	Command   string   `json:"command"`
	Source    Source   `json:"source"`
	Platforms []string `json:"platforms"`
}

type Source struct {
	URI       string `json:"uri"`
	Commit    string `json:"commit"`
	TreeState string `json:"treeState"` // clean or dirty
}

type ResourceDescriptor struct {
	URI    string            `json:"uri"`
	Name   string            `json:"name,omitempty"`
	Digest map[string]string `json:"digest,omitempty"`
}

type RunDetails struct {
	Builder  Builder  `json:"builder"`
	Metadata Metadata `json:"metadata"`
}

type Builder struct {
	ID string `json:"id"`
}

type Metadata struct {
	StartedOn  string `json:"startedOn"`
	FinishedOn string `json:"finishedOn"`
}

// Write writes the statement as indented JSON.
func Write(file string, s Statement) error {
	if len(s.Subject) == 0 {
		return fmt.Errorf("provenance without subjects")
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(file, append(data, '\n'), 0o644)
}

// Read reads a statement and checks its types.
func Read(file string) (Statement, error) {
	var s Statement
	data, err := os.ReadFile(file)
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(data, &s); err != nil {
		return s, fmt.Errorf("%s: %w", file, err)
	}
	if s.Type != StatementType || s.PredicateType != PredicateType {
		return s, fmt.Errorf("%s: not an in-toto v1 SLSA provenance v1 statement (%q, %q)", file, s.Type, s.PredicateType)
	}
	return s, nil
}

// BuilderID says who ran the build: the Makefile's release target on the releaser's
// machine (a local build, SLSA build level 1: the statement is signed with the
// release key, not by a hosted builder).
const BuilderID = "https://github.com/metaconceal/metaconceal/blob/main/Makefile#release"
