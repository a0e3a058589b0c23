package console

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

func parseTemplates() (*template.Template, error) {
	return template.New("console").Funcs(funcs).ParseFS(templateFS, "templates/*.html")
}

// render executes a page: every page file defines "<name>-title" and
// "<name>-content", which the layout places.
func (c *Console) render(w http.ResponseWriter, status int, name string, data map[string]any) {
	if data == nil {
		data = map[string]any{}
	}
	data["Page"] = name
	data["CSRF"] = c.token
	var buf bytes.Buffer
	if err := c.tmpl.ExecuteTemplate(&buf, "layout", data); err != nil {
		c.log.Error().Err(err).Str("page", name).Msg("rendering page")
		http.Error(w, "rendering the page failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// fragment renders one named template (for the event streams).
func (c *Console) fragment(name string, data any) ([]byte, error) {
	var buf bytes.Buffer
	err := c.tmpl.ExecuteTemplate(&buf, name, data)
	return buf.Bytes(), err
}

// apiFailure renders an error from the servers: a refusal with the server's
// own words and status, anything else as unreachable.
func (c *Console) apiFailure(w http.ResponseWriter, what string, err error) {
	var e *api.Error
	if errors.As(err, &e) {
		c.render(w, replyStatus(e), "error", map[string]any{"What": what, "Refusal": e})
		return
	}
	c.render(w, http.StatusBadGateway, "error", map[string]any{"What": what, "Err": err.Error()})
}

// replyStatus is the status to answer a refusal with: the servers' own, or
// 502 when theirs is not an error status (WriteHeader panics on nonsense).
func replyStatus(e *api.Error) int {
	if st := api.StatusOf(e.Kind); st != http.StatusInternalServerError {
		return st
	}
	return http.StatusBadGateway
}

// workerView is a worker as the fleet table shows it.
type workerView struct {
	W         fsm.Worker
	Alive     bool
	LeaseLeft time.Duration
	Capacity  int
	Out, In   int // active migrations from and to it
	Machines  []string
	Volumes   int
	Allocated int64 // bytes of the volumes on it
}

// serverView is one raft member as it describes itself.
type serverView struct {
	M         fsm.ServerMember
	Voter     bool
	Leader    bool
	RaftState string
	Index     uint64
	Ready     bool
	Err       string
}

func (c *Console) fleetPage(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	now := time.Now()
	data := map[string]any{}
	var problems []string
	fail := func(what string, err error) { problems = append(problems, what+": "+err.Error()) }

	st, err := c.client.Status(ctx)
	if err != nil {
		fail("server status", err)
	} else {
		data["Status"] = st
		data["Servers"] = c.servers(ctx, st)
	}
	ws, err := c.client.ListWorkers(ctx)
	if err != nil {
		fail("workers", err)
	}
	vols, err := c.client.ListVolumes(ctx, "")
	if err != nil {
		fail("volumes", err)
	}
	machines, err := c.client.ListMachines(ctx, "")
	if err != nil {
		fail("machines", err)
	}
	ms, err := c.client.ListMigrations(ctx, "")
	if err != nil {
		fail("migrations", err)
	}
	byName := map[string]*workerView{}
	views := make([]*workerView, 0, len(ws))
	for _, wk := range ws {
		v := &workerView{W: wk, Alive: wk.Alive(now), LeaseLeft: wk.LeaseExpiry.Sub(now), Capacity: wk.Capacity}
		if v.Capacity == 0 {
			v.Capacity = fsm.DefaultMigrationsPerWorker
		}
		byName[wk.Name] = v
		views = append(views, v)
	}
	sort.Slice(views, func(i, j int) bool { return views[i].W.Name < views[j].W.Name })
	for _, m := range ms {
		if !m.Active() {
			continue
		}
		if v := byName[m.Source]; v != nil {
			v.Out++
		}
		if v := byName[m.Target]; v != nil {
			v.In++
		}
	}
	sort.Slice(machines, func(i, j int) bool { return machines[i].ID < machines[j].ID })
	for _, m := range machines {
		if v := byName[m.Worker]; v != nil {
			v.Machines = append(v.Machines, m.ID)
		}
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].ID < vols[j].ID })
	for _, vol := range vols {
		if v := byName[vol.Worker]; v != nil && vol.State != fsm.VolDestroyed {
			v.Volumes++
			v.Allocated += vol.Size
		}
	}
	data["Workers"] = views
	data["Machines"] = machines
	data["Volumes"] = vols
	data["Migrations"] = viewMigrations(ms, now)
	data["Problems"] = problems
	c.render(w, http.StatusOK, "fleet", data)
}

// servers asks every member for its own view: the answering server's
// StatusReply knows only its own raft state.
func (c *Console) servers(ctx context.Context, st *api.StatusReply) []serverView {
	out := make([]serverView, len(st.Servers))
	var wg sync.WaitGroup
	for i, m := range st.Servers {
		out[i] = serverView{M: m, Voter: slices.Contains(st.Voters, m.ID), Leader: m.ID == st.Leader}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl, err := c.member(m.APIAddr)
			if err != nil {
				out[i].Err = err.Error()
				return
			}
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			s, err := cl.Status(sctx)
			if err != nil {
				out[i].Err = err.Error()
				return
			}
			out[i].RaftState, out[i].Index, out[i].Ready = s.RaftState, s.Index, s.Ready
		}()
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool { return out[i].M.ID < out[j].M.ID })
	return out
}

func (c *Console) migrationPage(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	m, err := c.client.GetMigration(ctx, id)
	if err != nil {
		c.apiFailure(w, "migration "+id, err)
		return
	}
	c.render(w, http.StatusOK, "migration", map[string]any{"Detail": detail(m, time.Now())})
}

// migrationDetail is the live part of a migration's page.
type migrationDetail struct {
	migrationView
	States  []timelineEntry
	Applied []fsm.StepResult
	Keys    []fsm.KeyAccess
}

func detail(m *fsm.Migration, now time.Time) migrationDetail {
	d := migrationDetail{migrationView: viewMigration(m, now)}
	d.States, d.Applied, d.Keys = timeline(m)
	return d
}

func (c *Console) volumePage(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	v, err := c.client.GetVolume(ctx, id)
	if err != nil {
		c.apiFailure(w, "volume "+id, err)
		return
	}
	// Only the fields below reach the page; the key is never asked for.
	data := map[string]any{"V": volumeView{ID: v.ID, Worker: v.Worker, Size: v.Size, State: v.State,
		AttachedMachine: v.AttachedMachine, HasKey: v.HasKey, CreatedAt: v.CreatedAt, DestroyAfter: v.DestroyAfter}}
	if v.Layout != nil {
		data["Cipher"] = v.Layout.Cipher
		data["SectorSize"] = v.Layout.SectorSize
		data["DataOffset"] = v.Layout.DataOffset
	}
	if v.AttachedMachine != "" {
		if m, err := c.client.GetMachine(ctx, v.AttachedMachine); err == nil {
			data["Machine"] = m
		} else {
			data["MachineErr"] = err.Error()
		}
	}
	if ms, err := c.client.ListMigrations(ctx, ""); err == nil {
		var mine []*fsm.Migration
		for _, m := range ms {
			if m.Volume == v.ID || m.TargetVol == v.ID {
				mine = append(mine, m)
			}
		}
		data["Migrations"] = viewMigrations(mine, time.Now())
	} else {
		data["MigrationsErr"] = err.Error()
	}
	c.render(w, http.StatusOK, "volume", data)
}

// volumeView holds the volume fields the page may show.
type volumeView struct {
	ID, Worker, AttachedMachine string
	Size                        int64
	State                       fsm.VolumeState
	HasKey                      bool
	CreatedAt, DestroyAfter     time.Time
}

// rollbackRow is one step of what an abort sets off.
type rollbackRow struct {
	Event fsm.Event
	From  fsm.State
	To    fsm.State
	Who   string
	Doc   string
}

// abortPlan lists the rows an abort sets off, from the table: the abort row
// itself, then every row leaving a state of the rollback line.
func abortPlan(m *fsm.Migration) []rollbackRow {
	who := func(roles []fsm.Role) string {
		var out []string
		for _, r := range roles {
			switch r {
			case fsm.RoleSource:
				out = append(out, "source worker "+m.Source)
			case fsm.RoleTarget:
				out = append(out, "target worker "+m.Target)
			default:
				out = append(out, string(r))
			}
		}
		return strings.Join(out, " or ")
	}
	var rows []rollbackRow
	if t, ok := fsm.Lookup(fsm.EvAbort); ok {
		rows = append(rows, rollbackRow{t.Event, m.State, t.To, "you (operator)", t.Doc})
	}
	for _, s := range statePaths.Rollback {
		for _, t := range fsm.Transitions {
			if len(t.From) == 1 && t.From[0] == s {
				rows = append(rows, rollbackRow{t.Event, s, t.To, who(t.Roles), t.Doc})
			}
		}
	}
	return rows
}

func (c *Console) abortPlanPage(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	m, err := c.client.GetMigration(ctx, id)
	if err != nil {
		c.apiFailure(w, "migration "+id, err)
		return
	}
	c.render(w, http.StatusOK, "abort", c.abortData(m, "", ""))
}

func (c *Console) abortData(m *fsm.Migration, typed, problem string) map[string]any {
	return map[string]any{"View": viewMigration(m, time.Now()), "Plan": abortPlan(m), "AbortableFrom": abortableFrom(),
		"Typed": typed, "Problem": problem}
}

func (c *Console) abortApply(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	typed := strings.TrimSpace(r.PostForm.Get("confirm"))
	if typed != id {
		m, err := c.client.GetMigration(ctx, id)
		if err != nil {
			c.apiFailure(w, "migration "+id, err)
			return
		}
		c.render(w, http.StatusUnprocessableEntity, "abort", c.abortData(m, typed,
			fmt.Sprintf("Nothing was sent: the confirmation %q is not the migration ID. Type %s exactly to abort.", typed, id)))
		return
	}
	reason := strings.TrimSpace(r.PostForm.Get("reason"))
	if reason == "" {
		reason = "aborted by the operator from ferry ui"
	}
	if len(reason) > 500 {
		reason = strings.ToValidUTF8(reason[:500], "")
	}
	m, err := c.client.Abort(ctx, id, reason)
	if err != nil {
		var e *api.Error
		data := map[string]any{"ID": id}
		status := http.StatusBadGateway
		if errors.As(err, &e) {
			data["Refusal"] = e
			status = replyStatus(e)
		} else {
			data["Err"] = err.Error()
		}
		c.log.Info().Str("migration", id).Err(err).Msg("abort refused")
		c.render(w, status, "result", data)
		return
	}
	c.log.Info().Str("migration", id).Str("reason", reason).Str("state", string(m.State)).Msg("abort accepted")
	c.render(w, http.StatusOK, "result", map[string]any{"ID": id, "M": m})
}
