package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
)

const claimsKey = "esir.claims"

func bearer(c echo.Context) (string, bool) {
	h := c.Request().Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	return strings.TrimSpace(tok), ok && strings.TrimSpace(tok) != ""
}

// requireAdmin lets through requests carrying a known admin token.
func (a *API) requireAdmin(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		tok, ok := bearer(c)
		if !ok {
			return echo.NewHTTPError(http.StatusUnauthorized, "authorization: an admin token is required (Authorization: Bearer TOKEN)")
		}
		var found *store.Token
		err := a.st.View(c.Request().Context(), func(tx store.Tx) error {
			var err error
			found, err = tx.TokenByHash(auth.HashToken(tok))
			return err
		})
		if errors.Is(err, store.ErrNotFound) {
			return echo.NewHTTPError(http.StatusUnauthorized, "authorization: unknown admin token")
		}
		if err != nil {
			return err
		}
		c.Set("esir.admin", found.ID)
		return next(c)
	}
}

// requireNode lets through requests carrying a valid node token; handlers
// read its claims with nodeClaims.
func (a *API) requireNode(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		tok, ok := bearer(c)
		if !ok {
			return echo.NewHTTPError(http.StatusUnauthorized, "authorization: a node token is required (Authorization: Bearer TOKEN)")
		}
		cl, err := a.signer.Verify(tok, a.now())
		if err != nil {
			return echo.NewHTTPError(http.StatusUnauthorized, "authorization: "+err.Error())
		}
		// The installed system's token enrolls and follows its SSI
		// assignment, nothing else.
		installed := strings.HasSuffix(c.Path(), "/enroll") || strings.HasSuffix(c.Path(), "/ssi") || strings.HasSuffix(c.Path(), "/ssi/status")
		if cl.Kind == auth.Enroll && !installed {
			return echo.NewHTTPError(http.StatusForbidden, "authorization: an enroll token may only enroll and follow the node's SSI assignment")
		}
		c.Set(claimsKey, cl)
		return next(c)
	}
}

// nodeMAC returns the MAC the token is bound to, checking that the request
// body's MAC (when given) is the same: an agent cannot act for another node.
func nodeMAC(c echo.Context, bodyMAC string) (string, error) {
	cl := c.Get(claimsKey).(auth.Claims)
	if bodyMAC == "" {
		return cl.MAC, nil
	}
	if !strings.EqualFold(bodyMAC, cl.MAC) {
		return "", echo.NewHTTPError(http.StatusForbidden, "mac: token is bound to "+cl.MAC+", not "+bodyMAC)
	}
	return cl.MAC, nil
}

// CreateAdminToken makes and stores a new admin token named name. The
// returned token is the only time its secret is seen.
func CreateAdminToken(ctx context.Context, st store.Store, name string, now time.Time) (TokenResponse, error) {
	tok, id, hash, err := auth.NewAdminToken()
	if err != nil {
		return TokenResponse{}, err
	}
	err = st.Update(ctx, func(tx store.Tx) error {
		return tx.PutToken(store.Token{ID: id, Name: name, Hash: hash, Created: now.UTC()})
	})
	if err != nil {
		return TokenResponse{}, fmt.Errorf("create admin token %q: %w", name, err)
	}
	return TokenResponse{ID: id, Name: name, Token: tok}, nil
}
