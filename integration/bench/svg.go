package bench

import (
	"fmt"
	"math"
	"os"
	"strings"
)

// point is one sample of a curve: seconds since start, bytes.
type point struct{ T, Y float64 }

// series is one curve of a plot.
type series struct {
	Name   string
	Points []point
}

var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"}

// writeSVG draws the series as a line chart (x: seconds, y: MiB) into path.
// Hand-made SVG: the suite adds no plotting dependency.
func writeSVG(path, title string, ss []series) error {
	const w, h = 720.0, 400.0
	const left, right, top, bottom = 70.0, 20.0, 40.0, 50.0
	var maxT, maxY float64
	for _, s := range ss {
		for _, p := range s.Points {
			maxT = math.Max(maxT, p.T)
			maxY = math.Max(maxY, p.Y/(1<<20))
		}
	}
	maxT = niceCeil(math.Max(maxT, 0.001))
	maxY = niceCeil(math.Max(maxY, 0.001))
	x := func(t float64) float64 { return left + t/maxT*(w-left-right) }
	y := func(v float64) float64 { return h - bottom - v/maxY*(h-top-bottom) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", w, h, w, h)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="22" font-size="15" text-anchor="middle">%s</text>`+"\n", w/2, esc(title))
	// Axes and grid.
	for i := 0; i <= 5; i++ {
		tv := maxT * float64(i) / 5
		yv := maxY * float64(i) / 5
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(tv), y(0), x(tv), y(maxY))
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(0), y(yv), x(maxT), y(yv))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x(tv), h-bottom+18, trimFloat(tv))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y(yv)+4, trimFloat(yv))
	}
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(0), y(0), x(maxT), y(0))
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(0), y(0), x(0), y(maxY))
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="middle">seconds</text>`+"\n", (left+w-right)/2, h-12)
	fmt.Fprintf(&b, `<text x="16" y="%.0f" text-anchor="middle" transform="rotate(-90 16 %.0f)">hydrated MiB</text>`+"\n", (top+h-bottom)/2, (top+h-bottom)/2)
	for i, s := range ss {
		col := palette[i%len(palette)]
		var pts []string
		for _, p := range s.Points {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(p.T), y(p.Y/(1<<20))))
		}
		if len(pts) > 0 {
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", col, strings.Join(pts, " "))
		}
		ly := top + 8 + float64(i)*18
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="%s" stroke-width="3"/>`+"\n", left+12, ly, left+32, ly, col)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f">%s</text>`+"\n", left+38, ly+4, esc(s.Name))
	}
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	e := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*e >= v {
			return m * e
		}
	}
	return 10 * e
}

func trimFloat(v float64) string {
	s := fmt.Sprintf("%.2f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

func esc(s string) string {
	r := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;")
	return r.Replace(s)
}
