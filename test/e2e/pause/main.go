// Command pause is the sandbox ("pause") image of the real-runtime e2e: no registry can be
// reached from the test machines, so the image is built locally from this program. It
// holds the pod's namespaces open and exits on SIGTERM or SIGINT, as registry.k8s.io/pause
// does. Built with CGO_ENABLED=0 so the image needs nothing but this one static binary.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// As PID 1 of the sandbox it may inherit orphans; reap them so none stays a zombie.
	children := make(chan os.Signal, 1)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			return
		case <-children:
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
