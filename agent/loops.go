package agent

import "github.com/ferry-dev/ferry/loopdev"

// LoopDevs attaches loop devices with the kernel's loop driver.
type LoopDevs struct{}

func (LoopDevs) Attach(path string, directIO bool) (string, error) {
	return loopdev.Attach(path, directIO)
}
func (LoopDevs) Detach(dev string) error { return loopdev.Detach(dev) }
func (LoopDevs) FindByBackingFile(path string) ([]string, error) {
	return loopdev.FindByBackingFile(path)
}
