package loopdev

// Loops attaches files to loop devices; the backends take it so their unit
// tests can count attachments without a kernel.
type Loops interface {
	Attach(path string, directIO bool) (string, error)
	Detach(dev string) error
	FindByBackingFile(path string) ([]string, error)
}

// System is Loops with the kernel's loop driver (through losetup).
type System struct{}

func (System) Attach(path string, directIO bool) (string, error) { return Attach(path, directIO) }
func (System) Detach(dev string) error                           { return Detach(dev) }
func (System) FindByBackingFile(path string) ([]string, error)   { return FindByBackingFile(path) }
