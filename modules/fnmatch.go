package modules

import "strings"

// fnmatch reports whether name matches the shell pattern the way glibc's
// fnmatch(pattern, name, 0) does, which is what kmod uses for modules.alias:
// '*' matches any run of bytes including '/', '?' any one byte, "[...]" a
// set (with ranges and '!' or '^' to negate), and '\' quotes the next byte.
// A malformed set ("[" without "]") matches a literal '['.
func fnmatch[P ~string | ~[]byte](pattern P, name string) bool {
	p, n := 0, 0
	// Backtracking point for the last '*': where the pattern resumes and
	// which name byte the star will swallow next.
	starP, starN := -1, 0
	for n < len(name) || p < len(pattern) {
		if p < len(pattern) {
			switch c := pattern[p]; c {
			case '*':
				starP, starN = p, n
				p++
				continue
			case '?':
				if n < len(name) {
					p++
					n++
					continue
				}
			case '[':
				if n < len(name) {
					if ok, next, valid := matchSet(pattern, p, name[n]); valid {
						if ok {
							p = next
							n++
							continue
						}
					} else if name[n] == '[' {
						p++
						n++
						continue
					}
				}
			case '\\':
				if p+1 < len(pattern) {
					if n < len(name) && name[n] == pattern[p+1] {
						p += 2
						n++
						continue
					}
				} else if n < len(name) && name[n] == '\\' {
					p++
					n++
					continue
				}
			default:
				if n < len(name) && name[n] == c {
					p++
					n++
					continue
				}
			}
		}
		if starP >= 0 && starN < len(name) {
			starN++
			p, n = starP+1, starN
			continue
		}
		return false
	}
	return true
}

// matchSet matches byte c against the set starting at pattern[p] == '['. It
// returns whether c is in the set, the index after the closing ']', and
// whether the set is well formed.
func matchSet[P ~string | ~[]byte](pattern P, p int, c byte) (match bool, next int, valid bool) {
	i := p + 1
	negate := false
	if i < len(pattern) && (pattern[i] == '!' || pattern[i] == '^') {
		negate = true
		i++
	}
	first := true
	for i < len(pattern) {
		if pattern[i] == ']' && !first {
			return match != negate, i + 1, true
		}
		first = false
		if pattern[i] == '[' && i+1 < len(pattern) && pattern[i+1] == ':' {
			if end := indexFrom(string(pattern[i+2:]), 0, ":]"); end >= 0 {
				end += i + 2
				if classMatch(string(pattern[i+2:end]), c) {
					match = true
				}
				i = end + 2
				continue
			}
		}
		lo := pattern[i]
		if lo == '\\' && i+1 < len(pattern) {
			i++
			lo = pattern[i]
		}
		i++
		hi := lo
		if i+1 < len(pattern) && pattern[i] == '-' && pattern[i+1] != ']' {
			hi = pattern[i+1]
			i += 2
			if hi == '\\' && i < len(pattern) {
				hi = pattern[i]
				i++
			}
		}
		if lo <= c && c <= hi {
			match = true
		}
	}
	return false, 0, false
}

func indexFrom(s string, from int, sub string) int {
	if i := strings.Index(s[from:], sub); i >= 0 {
		return from + i
	}
	return -1
}

func classMatch(class string, c byte) bool {
	isUpper := 'A' <= c && c <= 'Z'
	isLower := 'a' <= c && c <= 'z'
	isDigit := '0' <= c && c <= '9'
	switch class {
	case "alpha":
		return isUpper || isLower
	case "digit":
		return isDigit
	case "alnum":
		return isUpper || isLower || isDigit
	case "upper":
		return isUpper
	case "lower":
		return isLower
	case "xdigit":
		return isDigit || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
	case "space":
		return c == ' ' || ('\t' <= c && c <= '\r')
	case "punct":
		return c > ' ' && c < 0x7f && !isUpper && !isLower && !isDigit
	}
	return false
}

// literalPrefix returns the part of pattern before its first special byte:
// every name the pattern matches starts with it.
func literalPrefix(pattern string) string {
	for i := 0; i < len(pattern); i++ {
		switch pattern[i] {
		case '*', '?', '[', '\\':
			return pattern[:i]
		}
	}
	return pattern
}

// normalizeAlias turns '-' into '_' outside "[...]" sets, as kmod does to
// aliases on both sides of a lookup.
func normalizeAlias(s string) string {
	if strings.IndexByte(s, '-') < 0 {
		return s
	}
	b := []byte(s)
	inSet := false
	for i, c := range b {
		switch {
		case c == '[':
			inSet = true
		case c == ']':
			inSet = false
		case c == '-' && !inSet:
			b[i] = '_'
		}
	}
	return string(b)
}

// normalizeName is a module name as the kernel knows it ('-' becomes '_').
func normalizeName(s string) string {
	if strings.IndexByte(s, '-') < 0 {
		return s
	}
	b := []byte(s)
	for i, c := range b {
		if c == '-' {
			b[i] = '_'
		}
	}
	return string(b)
}
