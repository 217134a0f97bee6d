//! Loss curves as a PNG, with no font or plotting dependency: a small RGB canvas, Bresenham
//! lines, "nice" axis ticks and a built-in 5x7 bitmap font for the title, tick labels and
//! legend.

use super::checkpoint::write_atomic;
use crate::train::error::{Result, TrainError as Error};
use std::path::Path;

/// One curve: `points` are `(step, loss)`; non-finite points are skipped and break the line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(step, loss)` points, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub rgb: [u8; 3],
    /// Draws the line dashed instead of solid.
    pub dashed: bool,
}

/// Canvas sizes accepted: large enough for axes and labels, small enough that a typo in a size
/// does not allocate gigabytes.
const MIN_SIZE: (u32, u32) = (160, 120);
const MAX_SIDE: u32 = 8192;

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GRID: [u8; 3] = [225, 225, 225];
const FRAME: [u8; 3] = [150, 150, 150];

// ---------------------------------------------------------------------------------------------
// Font: 5 columns x 7 rows per glyph, one byte per row, bit 4 is the leftmost column.

const GLYPH_W: i64 = 5;
const GLYPH_H: i64 = 7;
/// Horizontal advance per character, in font pixels (one column of spacing).
const ADVANCE: i64 = 6;

#[rustfmt::skip]
const FONT: &[(char, [u8; 7])] = &[
    (' ', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]),
    ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
    ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
    ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
    ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
    ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
    ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
    ('A', [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11]),
    ('B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
    ('C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]),
    ('D', [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C]),
    ('E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]),
    ('F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
    ('G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]),
    ('H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
    ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
    ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
    ('M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]),
    ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    ('O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
    ('Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]),
    ('R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
    ('S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]),
    ('T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]),
    ('X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
    ('Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]),
    ('Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
    ('a', [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F]),
    ('b', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E]),
    ('c', [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E]),
    ('d', [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F]),
    ('e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]),
    ('f', [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08]),
    ('g', [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
    ('h', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11]),
    ('i', [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E]),
    ('j', [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C]),
    ('k', [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12]),
    ('l', [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('m', [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11]),
    ('n', [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11]),
    ('o', [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E]),
    ('p', [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10]),
    ('q', [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01]),
    ('r', [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10]),
    ('s', [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E]),
    ('t', [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06]),
    ('u', [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D]),
    ('v', [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('w', [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A]),
    ('x', [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11]),
    ('y', [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
    ('z', [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F]),
    ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
    (',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
    (':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
    (';', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08]),
    ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
    ('+', [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00]),
    ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
    ('=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
    ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
    (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
    ('[', [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E]),
    (']', [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E]),
    ('<', [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02]),
    ('>', [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08]),
    ('/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]),
    ('*', [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00]),
    ('%', [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03]),
    ('#', [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A]),
    ('|', [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('!', [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04]),
    ('\'', [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00]),
    ('"', [0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00]),
    ('^', [0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00]),
    ('?', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04]),
];

/// The glyph of `c`; characters the font lacks are drawn as `?`.
fn glyph(c: char) -> [u8; 7] {
    let find = |c: char| FONT.iter().find(|(g, _)| *g == c).map(|(_, rows)| *rows);
    find(c).or_else(|| find('?')).unwrap_or([0; 7])
}

// ---------------------------------------------------------------------------------------------
// Canvas

struct Canvas {
    w: i64,
    h: i64,
    rgb: Vec<u8>,
    /// Text magnification: one font pixel is `scale x scale` image pixels.
    scale: i64,
}

/// A dash pattern: `(on, off)` pixels along a line.
type Dash = (i64, i64);

/// A clip rectangle, inclusive of `x0, y0`, exclusive of `x1, y1`.
#[derive(Clone, Copy)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        let (w, h) = (w as i64, h as i64);
        Canvas {
            w,
            h,
            rgb: WHITE.repeat((w * h) as usize),
            scale: ((w.min(h)) / 400).clamp(1, 3),
        }
    }

    fn full(&self) -> Rect {
        Rect {
            x0: 0,
            y0: 0,
            x1: self.w,
            y1: self.h,
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3], clip: Rect) {
        if x >= clip.x0.max(0)
            && x < clip.x1.min(self.w)
            && y >= clip.y0.max(0)
            && y < clip.y1.min(self.h)
        {
            let i = ((y * self.w + x) * 3) as usize;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn fill(&mut self, r: Rect, c: [u8; 3]) {
        for y in r.y0..r.y1 {
            for x in r.x0..r.x1 {
                self.set(x, y, c, r);
            }
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: [u8; 3]) {
        let clip = self.full();
        for x in x0..=x1 {
            self.set(x, y, c, clip);
        }
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: [u8; 3]) {
        let clip = self.full();
        for y in y0..=y1 {
            self.set(x, y, c, clip);
        }
    }

    fn text_width(&self, text: &str) -> i64 {
        let n = text.chars().count() as i64;
        if n == 0 {
            0
        } else {
            (n * ADVANCE - 1) * self.scale
        }
    }

    fn text_height(&self) -> i64 {
        GLYPH_H * self.scale
    }

    /// Draws `text` with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, c: [u8; 3]) {
        let s = self.scale;
        let clip = self.full();
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + k as i64 * ADVANCE * s;
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..s {
                            for dx in 0..s {
                                self.set(gx + col * s + dx, y + row as i64 * s + dy, c, clip);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A 2-pixel-thick line clipped to `clip`. `dash` is `(on, off)` in pixels along the line,
    /// and `phase` carries the dash position from one segment to the next so a dashed polyline
    /// looks continuous.
    #[allow(clippy::too_many_arguments)]
    fn line(
        &mut self,
        (mut x0, mut y0): (i64, i64),
        (x1, y1): (i64, i64),
        c: [u8; 3],
        clip: Rect,
        dash: Option<Dash>,
        phase: &mut i64,
    ) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            let on = dash.is_none_or(|(a, b)| phase.rem_euclid(a + b) < a);
            if on {
                for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    self.set(x0 + ox, y0 + oy, c, clip);
                }
            }
            if x0 == x1 && y0 == y1 {
                break;
            }
            *phase += 1;
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    fn encode_png(&self) -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(|e| e.to_string())?;
            writer
                .write_image_data(&self.rgb)
                .map_err(|e| e.to_string())?;
            writer.finish().map_err(|e| e.to_string())?;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Axes

/// An axis range with its tick values.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    /// Decimal places of the tick labels (`None`: scientific notation).
    decimals: Option<usize>,
}

impl Axis {
    /// Extends `[lo, hi]` to multiples of a 1-2-5 step giving about `target` intervals.
    fn nice(lo: f64, hi: f64, target: i64) -> Axis {
        let (lo, hi) = if lo < hi {
            (lo, hi)
        } else {
            // A single value: centre it in a small range.
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad, hi + pad)
        };
        let raw = (hi - lo) / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let f = raw / mag;
        let step = mag
            * if f <= 1.0 {
                1.0
            } else if f <= 2.0 {
                2.0
            } else if f <= 5.0 {
                5.0
            } else {
                10.0
            };
        let (k0, k1) = ((lo / step).floor(), (hi / step).ceil());
        if !(step.is_finite() && step > 0.0 && k0.is_finite() && k1.is_finite() && k1 - k0 <= 50.0)
        {
            // Extreme magnitudes: no nice grid, label the ends.
            return Axis {
                lo,
                hi,
                ticks: vec![lo, hi],
                decimals: None,
            };
        }
        let ticks: Vec<f64> = (0..=(k1 - k0) as i64)
            .map(|k| (k0 + k as f64) * step)
            .collect();
        let exp = step.log10().floor();
        let big = ticks.iter().any(|t| t.abs() >= 1e7);
        let decimals = if big || exp < -6.0 {
            None
        } else {
            Some((-exp).max(0.0) as usize)
        };
        Axis {
            lo: k0 * step,
            hi: k1 * step,
            ticks,
            decimals,
        }
    }

    fn label(&self, v: f64) -> String {
        let s = match self.decimals {
            Some(d) => format!("{v:.d$}"),
            None => {
                let s = format!("{v:.2e}");
                // Trim "1.50e3" to "1.5e3" and "1.00e3" to "1e3".
                match s.split_once('e') {
                    Some((m, e)) if m.contains('.') => {
                        format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
                    }
                    _ => s,
                }
            }
        };
        if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
            s[1..].to_string()
        } else {
            s
        }
    }

    /// Fraction of the way from `lo` to `hi` (0 for a degenerate span).
    fn frac(&self, v: f64) -> f64 {
        let t = (v - self.lo) / (self.hi - self.lo);
        if t.is_finite() {
            t
        } else {
            0.0
        }
    }
}

fn finite_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

// ---------------------------------------------------------------------------------------------
// The chart

/// Line chart: x = step, y = loss, with optional horizontal reference lines `(name, y, rgb)`
/// (e.g. the entropy floor, drawn dashed), axes with tick labels, grid, and a legend naming
/// every series and reference line. Axes fit every finite point; non-finite points are skipped.
/// Writes the PNG atomically.
pub fn plot_losses(
    path: &Path,
    title: &str,
    series: &[Series],
    hlines: &[(String, f64, [u8; 3])],
    width: u32,
    height: u32,
) -> Result<()> {
    for (name, value, min) in [("width", width, MIN_SIZE.0), ("height", height, MIN_SIZE.1)] {
        if value < min || value > MAX_SIDE {
            return Err(Error::InvalidOption {
                name,
                value: value.to_string(),
                reason: "plot size must be at least 160 x 120 and at most 8192 pixels a side",
            });
        }
    }
    let png = render(title, series, hlines, width, height).map_err(|message| Error::File {
        path: path.display().to_string(),
        message,
    })?;
    write_atomic(path, &png)
}

fn render(
    title: &str,
    series: &[Series],
    hlines: &[(String, f64, [u8; 3])],
    width: u32,
    height: u32,
) -> std::result::Result<Vec<u8>, String> {
    let mut cv = Canvas::new(width, height);
    let s = cv.scale;
    let th = cv.text_height();

    let all = || series.iter().flat_map(|s| s.points.iter());
    let xr = finite_range(all().filter(|p| p.1.is_finite()).map(|p| p.0)).unwrap_or((0.0, 1.0));
    let yr = finite_range(
        all()
            .filter(|p| p.0.is_finite())
            .map(|p| p.1)
            .chain(hlines.iter().map(|h| h.1)),
    )
    .unwrap_or((0.0, 1.0));

    // Margins depend on the label sizes, the tick count on the plot size: estimate the plot
    // size with a typical label width first.
    let top = th * 3 + 12;
    let bottom = th * 2 + 6 * s + 12;
    let right = 8 * s + 8;
    let rough_h = cv.h - top - bottom;
    let yaxis = Axis::nice(yr.0, yr.1, (rough_h / (40 * s)).clamp(2, 10));
    let ylabels: Vec<String> = yaxis.ticks.iter().map(|&t| yaxis.label(t)).collect();
    let ylabel_w = ylabels.iter().map(|l| cv.text_width(l)).max().unwrap_or(0);
    let left = ylabel_w + 6 * s + 8;
    let plot = Rect {
        x0: left,
        y0: top,
        x1: cv.w - right,
        y1: cv.h - bottom,
    };
    if plot.x1 - plot.x0 < 40 || plot.y1 - plot.y0 < 40 {
        return Err(format!(
            "a {width} x {height} image leaves no room for the plot area next to the labels"
        ));
    }
    let xaxis = Axis::nice(xr.0, xr.1, ((plot.x1 - plot.x0) / (80 * s)).clamp(2, 10));
    let (pw, ph) = (
        (plot.x1 - plot.x0 - 1) as f64,
        (plot.y1 - plot.y0 - 1) as f64,
    );
    // Clamped so that absurd values cannot make Bresenham walk billions of pixels.
    let px = |v: f64| plot.x0 + (xaxis.frac(v) * pw).round().clamp(-1.0, pw + 1.0) as i64;
    let py = |v: f64| plot.y1 - 1 - (yaxis.frac(v) * ph).round().clamp(-1.0, ph + 1.0) as i64;

    // Title, grid, axes, ticks and labels.
    let tw = cv.text_width(title);
    cv.text((cv.w - tw) / 2, 4, title, BLACK);
    for (&t, label) in yaxis.ticks.iter().zip(&ylabels) {
        let y = py(t);
        cv.hline(plot.x0, plot.x1 - 1, y, GRID);
        cv.hline(plot.x0 - 4, plot.x0 - 1, y, BLACK);
        let lw = cv.text_width(label);
        cv.text(plot.x0 - 6 - lw, y - th / 2, label, BLACK);
    }
    for &t in &xaxis.ticks {
        let x = px(t);
        let label = xaxis.label(t);
        cv.vline(x, plot.y0, plot.y1 - 1, GRID);
        cv.vline(x, plot.y1, plot.y1 + 3, BLACK);
        let lw = cv.text_width(&label);
        cv.text(x - lw / 2, plot.y1 + 6, &label, BLACK);
    }
    cv.hline(plot.x0, plot.x1 - 1, plot.y1 - 1, BLACK);
    cv.vline(plot.x0, plot.y0, plot.y1 - 1, BLACK);
    let xcap = "step";
    cv.text(
        (plot.x0 + plot.x1 - cv.text_width(xcap)) / 2,
        plot.y1 + 6 + th + 4 * s,
        xcap,
        BLACK,
    );
    cv.text(4, top - th - 8, "loss", BLACK);

    // Reference lines under the curves.
    const HDASH: Dash = (6, 4);
    const SDASH: Dash = (10, 6);
    for (_, v, rgb) in hlines {
        if v.is_finite() {
            let y = py(*v);
            cv.line(
                (plot.x0, y),
                (plot.x1 - 1, y),
                *rgb,
                plot,
                Some(HDASH),
                &mut 0,
            );
        }
    }
    for sr in series {
        let dash = sr.dashed.then_some(SDASH);
        let mut phase = 0;
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &sr.points {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let p = (px(x), py(y));
            cv.line(prev.unwrap_or(p), p, sr.rgb, plot, dash, &mut phase);
            prev = Some(p);
        }
    }

    // Legend in the top-right corner of the plot area.
    let entries: Vec<(&str, [u8; 3], Option<Dash>)> = series
        .iter()
        .map(|sr| (sr.name.as_str(), sr.rgb, sr.dashed.then_some(SDASH)))
        .chain(hlines.iter().map(|(n, _, c)| (n.as_str(), *c, Some(HDASH))))
        .collect();
    if !entries.is_empty() {
        let sample = 20 * s;
        let row_h = th + 4 * s;
        let text_w = entries
            .iter()
            .map(|e| cv.text_width(e.0))
            .max()
            .unwrap_or(0);
        let box_w = 4 * s + sample + 4 * s + text_w + 4 * s;
        let box_h = entries.len() as i64 * row_h + 4 * s;
        let bx = (plot.x1 - 6 - box_w).max(plot.x0 + 2);
        let by = plot.y0 + 6;
        let frame = Rect {
            x0: bx,
            y0: by,
            x1: bx + box_w,
            y1: by + box_h,
        };
        cv.fill(frame, WHITE);
        cv.hline(frame.x0, frame.x1 - 1, frame.y0, FRAME);
        cv.hline(frame.x0, frame.x1 - 1, frame.y1 - 1, FRAME);
        cv.vline(frame.x0, frame.y0, frame.y1 - 1, FRAME);
        cv.vline(frame.x1 - 1, frame.y0, frame.y1 - 1, FRAME);
        for (k, (name, rgb, dash)) in entries.iter().enumerate() {
            let y = by + 4 * s + k as i64 * row_h;
            let mid = y + th / 2 - 1;
            let x = bx + 4 * s;
            let full = cv.full();
            cv.line((x, mid), (x + sample, mid), *rgb, full, *dash, &mut 0);
            cv.text(x + sample + 4 * s, y, name, BLACK);
        }
    }
    cv.encode_png()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_glyph_fits_five_columns_and_is_unique() {
        for (i, (c, rows)) in FONT.iter().enumerate() {
            assert!(
                rows.iter().all(|r| r & !0x1F == 0),
                "glyph {c:?} wider than 5"
            );
            assert!(
                FONT[..i].iter().all(|(d, _)| d != c),
                "glyph {c:?} defined twice"
            );
        }
        for c in ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain(" .-_:()/=".chars())
        {
            assert!(FONT.iter().any(|(g, _)| *g == c), "glyph {c:?} missing");
        }
        assert_eq!(glyph('\u{263A}'), glyph('?'));
    }

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(rgb: &[u8], c: [u8; 3]) -> usize {
        rgb.chunks_exact(3).filter(|p| *p == c).count()
    }

    fn out_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("distill-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn chart_decodes_with_every_series_colour() {
        let path = out_path("losses.png");
        let curve = |f: fn(f64) -> f64| (0..200).map(|i| (i as f64 * 5.0, f(i as f64))).collect();
        let series = [
            Series {
                name: "student (forward KL)".into(),
                points: curve(|i| 2.0 + 8.0 * (-i / 40.0).exp()),
                rgb: [220, 40, 40],
                dashed: false,
            },
            Series {
                name: "baseline_ce".into(),
                points: curve(|i| 2.5 + 7.0 * (-i / 60.0).exp()),
                rgb: [30, 90, 200],
                dashed: true,
            },
        ];
        let floor = [("entropy floor = 1.85".to_string(), 1.85, [20, 160, 60])];
        plot_losses(&path, "Distillation: loss/step", &series, &floor, 640, 400).unwrap();
        let (w, h, rgb) = decode(&path);
        assert_eq!((w, h), (640, 400));
        for c in [[220, 40, 40], [30, 90, 200], [20, 160, 60], BLACK] {
            assert!(count(&rgb, c) > 50, "colour {c:?} missing");
        }
        let tmp = path.with_file_name("losses.png.tmp");
        assert!(!tmp.exists());
    }

    #[test]
    fn non_finite_points_and_empty_inputs_do_not_panic() {
        let path = out_path("odd.png");
        let odd = Series {
            name: "odd".into(),
            points: vec![
                (0.0, 1.0),
                (1.0, f64::NAN),
                (2.0, f64::INFINITY),
                (f64::NAN, 3.0),
                (3.0, 2.0),
                (4.0, 1e300),
                (5.0, -1e300),
            ],
            rgb: [200, 0, 200],
            dashed: false,
        };
        plot_losses(
            &path,
            "",
            &[odd],
            &[("nan".into(), f64::NAN, [0, 200, 0])],
            300,
            200,
        )
        .unwrap();
        assert!(count(&decode(&path).2, [200, 0, 200]) > 0);
        plot_losses(&path, "empty", &[], &[], 200, 150).unwrap();
        assert_eq!(decode(&path).0, 200);
        let single = Series {
            name: "one point".into(),
            points: vec![(10.0, 3.0)],
            rgb: [1, 2, 3],
            dashed: true,
        };
        plot_losses(&path, "single", &[single], &[], 200, 150).unwrap();
        assert!(count(&decode(&path).2, [1, 2, 3]) > 0);
        let err = plot_losses(&path, "tiny", &[], &[], 10, 10).unwrap_err();
        assert!(matches!(err, Error::InvalidOption { name: "width", .. }));
    }

    #[test]
    fn nice_ticks() {
        let a = Axis::nice(0.0, 1000.0, 5);
        assert_eq!(a.ticks, [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        assert_eq!(a.label(400.0), "400");
        let b = Axis::nice(2.13, 3.87, 4);
        assert_eq!((b.lo, b.hi), (2.0, 4.0));
        assert_eq!(b.label(b.ticks[1]), "2.5");
        let c = Axis::nice(5.0, 5.0, 4);
        assert!(c.lo < 5.0 && c.hi > 5.0);
        let d = Axis::nice(-1e308, 1e308, 4);
        assert_eq!(d.ticks.len(), 2);
        assert_eq!(Axis::nice(0.0, 3e7, 3).label(1e7), "1e7");
    }
}
