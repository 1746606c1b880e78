package web

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
	"golang.org/x/crypto/bcrypt"
)

// Cookie and form names of the console's authentication.
const (
	sessionCookie = "esir_session"
	loginCookie   = "esir_login"
	csrfField     = "csrf"
	csrfHeader    = "X-CSRF-Token"
	// usersMeta is the store meta key holding the console's users (JSON).
	usersMeta = "web.users"
	// AdminUser is the user created on the first start.
	AdminUser = "admin"
	// PasswordFile is the file in the data directory that receives the
	// first admin password (mode 0600).
	PasswordFile = "admin-password"
	bcryptCost   = 11
	minPassword  = 10
)

// User is a console user; only the bcrypt hash of the password is kept.
type User struct {
	Name    string    `json:"name"`
	Hash    string    `json:"hash"`
	Created time.Time `json:"created"`
}

var userNameRE = regexp.MustCompile(`^[a-z][a-z0-9._-]{0,31}$`)

// session is one logged-in browser.
type session struct {
	id      string
	user    string
	csrf    string
	expires time.Time
}

// sessions keeps the logged-in browsers in memory: a server restart logs
// everybody out, which is the safe direction.
type sessions struct {
	mu  sync.Mutex
	m   map[string]*session
	ttl time.Duration
	now func() time.Time
}

func randomToken(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

func (s *sessions) create(user string) (*session, error) {
	id, err := randomToken(32)
	if err != nil {
		return nil, err
	}
	csrf, err := randomToken(24)
	if err != nil {
		return nil, err
	}
	ss := &session{id: id, user: user, csrf: csrf, expires: s.now().Add(s.ttl)}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for k, v := range s.m {
		if now.After(v.expires) {
			delete(s.m, k)
		}
	}
	s.m[id] = ss
	return ss, nil
}

// get returns the live session with that id, or nil.
func (s *sessions) get(id string) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.m[id]
	if ss == nil {
		return nil
	}
	if s.now().After(ss.expires) {
		delete(s.m, id)
		return nil
	}
	return ss
}

func (s *sessions) drop(id string) {
	s.mu.Lock()
	delete(s.m, id)
	s.mu.Unlock()
}

// dropUser ends every session of a user (deleted, or password changed).
func (s *sessions) dropUser(user, except string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, v := range s.m {
		if v.user == user && k != except {
			delete(s.m, k)
		}
	}
}

// users reads the console's users from the store.
func readUsers(tx store.Tx) (map[string]User, error) {
	v, err := tx.Meta(usersMeta)
	if err != nil {
		return nil, fmt.Errorf("read console users: %w", err)
	}
	users := map[string]User{}
	if v == "" {
		return users, nil
	}
	if err := json.Unmarshal([]byte(v), &users); err != nil {
		return nil, fmt.Errorf("console users (meta %s): %w", usersMeta, err)
	}
	return users, nil
}

func writeUsers(tx store.Tx, users map[string]User) error {
	b, err := json.Marshal(users)
	if err != nil {
		return err
	}
	if err := tx.SetMeta(usersMeta, string(b)); err != nil {
		return fmt.Errorf("write console users: %w", err)
	}
	return nil
}

// validPassword checks a new password's shape.
func validPassword(p string) error {
	if len(p) < minPassword {
		return fmt.Errorf("want at least %d characters", minPassword)
	}
	if len(p) > 72 {
		return errors.New("want at most 72 bytes (bcrypt's limit)")
	}
	return nil
}

// firstAdmin creates the admin user with a random password when there is no
// user yet; the password is written once to notice and to
// dataDir/PasswordFile (0600).
func (c *Console) firstAdmin(ctx context.Context) error {
	var created string
	err := c.st.Update(ctx, func(tx store.Tx) error {
		users, err := readUsers(tx)
		if err != nil || len(users) > 0 {
			return err
		}
		pw, err := randomToken(15)
		if err != nil {
			return err
		}
		h, err := bcrypt.GenerateFromPassword([]byte(pw), bcryptCost)
		if err != nil {
			return fmt.Errorf("hash admin password: %w", err)
		}
		users[AdminUser] = User{Name: AdminUser, Hash: string(h), Created: c.now().UTC()}
		created = pw
		return writeUsers(tx, users)
	})
	if err != nil || created == "" {
		return err
	}
	if c.opts.DataDir != "" {
		path := filepath.Join(c.opts.DataDir, PasswordFile)
		if err := writeFile0600(path, []byte(created+"\n")); err != nil {
			return fmt.Errorf("admin password file %s: %w", path, err)
		}
	}
	if c.opts.Notice != nil {
		fmt.Fprintf(c.opts.Notice, "esir server: web console user %q created with password (shown only now): %s\n", AdminUser, created)
	}
	c.log.Info("created the web console admin user", "user", AdminUser, "password_file", filepath.Join(c.opts.DataDir, PasswordFile))
	return nil
}

// writeFile0600 writes data atomically (temporary file, fsync, rename).
func writeFile0600(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// checkPassword verifies a user's password; the error says nothing about
// which half was wrong.
func (c *Console) checkPassword(ctx context.Context, name, pw string) error {
	var u User
	var found bool
	err := c.st.View(ctx, func(tx store.Tx) error {
		users, err := readUsers(tx)
		u, found = users[name]
		return err
	})
	if err != nil {
		return err
	}
	if !found {
		// Spend the same time as a wrong password.
		bcrypt.CompareHashAndPassword(c.dummyHash, []byte(pw))
		return errBadLogin
	}
	if bcrypt.CompareHashAndPassword([]byte(u.Hash), []byte(pw)) != nil {
		return errBadLogin
	}
	return nil
}

var errBadLogin = errors.New("unknown user or wrong password")

// checkToken verifies an admin API token and returns the token's name.
func (c *Console) checkToken(ctx context.Context, tok string) (string, error) {
	var t *store.Token
	err := c.st.View(ctx, func(tx store.Tx) error {
		var err error
		t, err = tx.TokenByHash(auth.HashToken(strings.TrimSpace(tok)))
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		return "", errors.New("unknown API token")
	}
	if err != nil {
		return "", err
	}
	return "token:" + t.Name, nil
}

// loginPage shows the login form with a fresh anti-CSRF cookie.
func (c *Console) loginPage(ec echo.Context) error {
	if ss := c.session(ec); ss != nil {
		return ec.Redirect(http.StatusSeeOther, Prefix+"/")
	}
	return c.renderLogin(ec, http.StatusOK, loginForm{Next: safeNext(ec.QueryParam("next")), Expired: ec.QueryParam("expired") != ""})
}

type loginForm struct {
	User, Next, Error string
	Token             bool
	Expired           bool
	CSRF              string
}

func (c *Console) renderLogin(ec echo.Context, status int, f loginForm) error {
	tok, err := randomToken(18)
	if err != nil {
		return err
	}
	ec.SetCookie(&http.Cookie{Name: loginCookie, Value: tok, Path: Prefix + "/login", HttpOnly: true,
		SameSite: http.SameSiteStrictMode, Secure: ec.IsTLS(), MaxAge: 3600})
	f.CSRF = tok
	return c.render(ec, status, "login", page{Title: "Sign in", Data: f})
}

// safeNext keeps a post-login redirect inside the console.
func safeNext(next string) string {
	if !strings.HasPrefix(next, Prefix+"/") || strings.HasPrefix(next, "//") || strings.Contains(next, "\\") {
		return Prefix + "/"
	}
	if u, err := url.Parse(next); err != nil || u.Host != "" || u.Scheme != "" {
		return Prefix + "/"
	}
	return next
}

func (c *Console) login(ec echo.Context) error {
	ctx := ec.Request().Context()
	f := loginForm{User: strings.TrimSpace(ec.FormValue("user")), Next: safeNext(ec.FormValue("next")), Token: ec.FormValue("method") == "token"}
	ck, err := ec.Cookie(loginCookie)
	if err != nil || ck.Value == "" || subtle.ConstantTimeCompare([]byte(ck.Value), []byte(ec.FormValue(csrfField))) != 1 {
		f.Error = "The sign-in form expired; please try again."
		return c.renderLogin(ec, http.StatusForbidden, f)
	}
	var who string
	if f.Token {
		tok := ec.FormValue("token")
		if strings.TrimSpace(tok) == "" {
			f.Error = "Enter an API token."
			return c.renderLogin(ec, http.StatusBadRequest, f)
		}
		if who, err = c.checkToken(ctx, tok); err != nil {
			c.log.Warn("console login refused", "method", "token", "remote", ec.RealIP(), "err", err)
			f.Error = "Unknown API token."
			return c.renderLogin(ec, http.StatusUnauthorized, f)
		}
	} else {
		if f.User == "" || ec.FormValue("password") == "" {
			f.Error = "Enter a user name and a password."
			return c.renderLogin(ec, http.StatusBadRequest, f)
		}
		if err := c.checkPassword(ctx, f.User, ec.FormValue("password")); err != nil {
			c.log.Warn("console login refused", "user", f.User, "remote", ec.RealIP(), "err", err)
			if errors.Is(err, errBadLogin) {
				f.Error = "Unknown user or wrong password."
				return c.renderLogin(ec, http.StatusUnauthorized, f)
			}
			return err
		}
		who = f.User
	}
	ss, err := c.sessions.create(who)
	if err != nil {
		return err
	}
	ec.SetCookie(&http.Cookie{Name: loginCookie, Path: Prefix + "/login", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	ec.SetCookie(&http.Cookie{Name: sessionCookie, Value: ss.id, Path: Prefix, HttpOnly: true, SameSite: http.SameSiteStrictMode,
		Secure: ec.IsTLS(), Expires: ss.expires})
	c.log.Info("console login", "user", who, "remote", ec.RealIP())
	return ec.Redirect(http.StatusSeeOther, f.Next)
}

func (c *Console) logout(ec echo.Context) error {
	if ss := c.session(ec); ss != nil {
		c.sessions.drop(ss.id)
		c.log.Info("console logout", "user", ss.user)
	}
	ec.SetCookie(&http.Cookie{Name: sessionCookie, Path: Prefix, MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	return ec.Redirect(http.StatusSeeOther, Prefix+"/login")
}

// session returns the request's live session, or nil.
func (c *Console) session(ec echo.Context) *session {
	ck, err := ec.Cookie(sessionCookie)
	if err != nil || ck.Value == "" {
		return nil
	}
	return c.sessions.get(ck.Value)
}

const sessionKey = "web.session"

// requireSession sends browsers without a live session to the login page
// (scripts get 401), and refuses state-changing requests whose CSRF token
// does not match the session's.
func (c *Console) requireSession(next echo.HandlerFunc) echo.HandlerFunc {
	return func(ec echo.Context) error {
		ss := c.session(ec)
		req := ec.Request()
		if ss == nil {
			_, hadCookie := ec.Cookie(sessionCookie)
			if req.Method != http.MethodGet || strings.Contains(req.Header.Get("Accept"), "text/event-stream") ||
				strings.Contains(req.Header.Get("Accept"), "application/json") {
				return echo.NewHTTPError(http.StatusUnauthorized, "session: sign in again")
			}
			q := url.Values{"next": {req.URL.RequestURI()}}
			if hadCookie == nil {
				q.Set("expired", "1")
			}
			return ec.Redirect(http.StatusSeeOther, Prefix+"/login?"+q.Encode())
		}
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			tok := req.Header.Get(csrfHeader)
			if tok == "" {
				tok = ec.FormValue(csrfField)
			}
			if subtle.ConstantTimeCompare([]byte(tok), []byte(ss.csrf)) != 1 {
				c.log.Warn("console request refused: CSRF token missing or wrong", "user", ss.user, "path", req.URL.Path)
				return echo.NewHTTPError(http.StatusForbidden, "csrf: the form's security token is missing or stale; reload the page and try again")
			}
		}
		ec.Set(sessionKey, ss)
		return next(ec)
	}
}

func sess(ec echo.Context) *session {
	ss, _ := ec.Get(sessionKey).(*session)
	return ss
}

// userRow is a user as the users page shows it.
type userRow struct {
	Name    string
	Created time.Time
	Self    bool
}

type usersPage struct {
	Users  []userRow
	Errors map[string]string
	Form   map[string]string
	Notice string
	Token  bool
}

func (c *Console) usersPage(ec echo.Context) error {
	return c.showUsers(ec, http.StatusOK, usersPage{Notice: ec.QueryParam("notice")})
}

func (c *Console) showUsers(ec echo.Context, status int, p usersPage) error {
	var users map[string]User
	if err := c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		var err error
		users, err = readUsers(tx)
		return err
	}); err != nil {
		return err
	}
	me := sess(ec).user
	for _, u := range users {
		p.Users = append(p.Users, userRow{Name: u.Name, Created: u.Created, Self: u.Name == me})
	}
	sort.Slice(p.Users, func(i, j int) bool { return p.Users[i].Name < p.Users[j].Name })
	p.Token = strings.HasPrefix(me, "token:")
	return c.render(ec, status, "users", page{Title: "Users", Nav: "users", Data: p})
}

// addUser creates a user (or sets an existing user's password when
// "reset" is checked).
func (c *Console) addUser(ec echo.Context) error {
	name := strings.TrimSpace(ec.FormValue("name"))
	pw := ec.FormValue("password")
	p := usersPage{Errors: map[string]string{}, Form: map[string]string{"name": name}}
	if !userNameRE.MatchString(name) {
		p.Errors["name"] = "Want 1-32 characters: lower-case letters, digits, '.', '_', '-', starting with a letter."
	}
	if err := validPassword(pw); err != nil {
		p.Errors["password"] = "Password: " + err.Error() + "."
	} else if pw != ec.FormValue("confirm") {
		p.Errors["confirm"] = "The two passwords differ."
	}
	if len(p.Errors) > 0 {
		return c.showUsers(ec, http.StatusBadRequest, p)
	}
	h, err := bcrypt.GenerateFromPassword([]byte(pw), bcryptCost)
	if err != nil {
		return fmt.Errorf("hash password of %s: %w", name, err)
	}
	reset := ec.FormValue("reset") != ""
	err = c.st.Update(ec.Request().Context(), func(tx store.Tx) error {
		users, err := readUsers(tx)
		if err != nil {
			return err
		}
		u, exists := users[name]
		if exists && !reset {
			return errUserExists
		}
		if !exists {
			u = User{Name: name, Created: c.now().UTC()}
		}
		u.Hash = string(h)
		users[name] = u
		return writeUsers(tx, users)
	})
	if errors.Is(err, errUserExists) {
		p.Errors["name"] = "User " + name + " exists; tick \"set a new password\" to change its password."
		return c.showUsers(ec, http.StatusConflict, p)
	}
	if err != nil {
		return err
	}
	if reset {
		c.sessions.dropUser(name, sess(ec).id)
	}
	c.log.Info("console user saved", "user", name, "by", sess(ec).user, "password_reset", reset)
	return ec.Redirect(http.StatusSeeOther, Prefix+"/users?notice="+url.QueryEscape("Saved user "+name+"."))
}

var errUserExists = errors.New("user exists")

func (c *Console) deleteUser(ec echo.Context) error {
	name := ec.Param("name")
	p := usersPage{Errors: map[string]string{}}
	if name == sess(ec).user {
		p.Errors["delete"] = "You cannot remove the user you are signed in as."
		return c.showUsers(ec, http.StatusConflict, p)
	}
	var last bool
	err := c.st.Update(ec.Request().Context(), func(tx store.Tx) error {
		users, err := readUsers(tx)
		if err != nil {
			return err
		}
		if _, ok := users[name]; !ok {
			return fmt.Errorf("user %s: %w", name, store.ErrNotFound)
		}
		if len(users) == 1 {
			last = true
			return nil
		}
		delete(users, name)
		return writeUsers(tx, users)
	})
	if errors.Is(err, store.ErrNotFound) {
		p.Errors["delete"] = "User " + name + " no longer exists."
		return c.showUsers(ec, http.StatusNotFound, p)
	}
	if err != nil {
		return err
	}
	if last {
		p.Errors["delete"] = "User " + name + " is the last user; add another first."
		return c.showUsers(ec, http.StatusConflict, p)
	}
	c.sessions.dropUser(name, "")
	c.log.Info("console user removed", "user", name, "by", sess(ec).user)
	return ec.Redirect(http.StatusSeeOther, Prefix+"/users?notice="+url.QueryEscape("Removed user "+name+"."))
}
