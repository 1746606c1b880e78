package install

// job is work a step starts in the background: a later step waits for it
// and reports its error as its own. Run waits for every job before it
// releases the disk, whatever failed.
type job struct {
	done chan struct{}
	err  error
}

// goJob runs fn in its own goroutine as one of the install's jobs.
func (r *run) goJob(fn func() error) *job {
	j := &job{done: make(chan struct{})}
	r.jobs = append(r.jobs, j)
	go func() {
		defer close(j.done)
		j.err = fn()
	}()
	return j
}

// wait returns the job's error once it has finished; a nil job (never
// started) has none.
func (j *job) wait() error {
	if j == nil {
		return nil
	}
	<-j.done
	return j.err
}

// waitJobs waits for every job started.
func (r *run) waitJobs() {
	for _, j := range r.jobs {
		<-j.done
	}
}
