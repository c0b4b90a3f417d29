// Decode matrix-vector product for MLX-affine quantized weights (dequantized in the shader):
// with W[r, k] = q * s + b per group, dot(W[r, :], x) = sum over groups of
// s * dot(q, x_g) + b * sum(x_g), so each code costs one multiply-add and the scale and bias
// one each per group. Each invocation owns CR consecutive weight rows (each loaded x vector
// serves all of them) and up to RT rows of x.
// w: uint32 words (32 / BITS codes each, low bits first); sb: (scale, bias) float32 pairs.
override WG: u32 = 64u;
override BITS: u32 = 4u;
override GS: u32 = 64u;
const RT: u32 = $RT;
const CR: u32 = $CR;

struct P { rows: u32, nin: u32, nout: u32, ystride: u32, yoff: u32, has_bias: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> sb: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let r0 = ((wid.x + wid.y * nwg.x) * WG + lid) * CR;
    if (r0 >= p.nout) { return; }
    let per = 32u / BITS;           // codes per word
    let nv = per / 4u;              // vec4s of codes per word
    let wpg = GS / per;             // words per group
    let groups = p.nin / GS;
    let mask = vec4<u32>((1u << BITS) - 1u);
    let in4 = p.nin / 4u;
    let ones = vec4<f32>(1.0);
    var wr: array<u32, CR>;
    for (var c = 0u; c < CR; c++) { wr[c] = min(r0 + c, p.nout - 1u) * groups; }
    var acc: array<array<f32, CR>, RT>;
    for (var g = 0u; g < groups; g++) {
        // Zeroed explicitly: a declaration inside a loop is not re-zeroed by every compiler.
        var sq: array<array<f32, CR>, RT>;
        var sx: array<f32, RT>;
        for (var t = 0u; t < RT; t++) {
            sx[t] = 0.0;
            for (var c = 0u; c < CR; c++) { sq[t][c] = 0.0; }
        }
        for (var j = 0u; j < wpg; j++) {
            var words: array<u32, CR>;
            for (var c = 0u; c < CR; c++) { words[c] = w[(wr[c] + g) * wpg + j]; }
            for (var v = 0u; v < nv; v++) {
                let sh = (vec4<u32>(0u, 1u, 2u, 3u) + v * 4u) * BITS;
                let xi = (g * GS + j * per + v * 4u) / 4u;
                for (var t = 0u; t < RT; t++) {
                    let xv = x[min(t, p.rows - 1u) * in4 + xi];
                    sx[t] += dot(ones, xv);
                    for (var c = 0u; c < CR; c++) {
                        sq[t][c] += dot(vec4<f32>((vec4<u32>(words[c]) >> sh) & mask), xv);
                    }
                }
            }
        }
        for (var c = 0u; c < CR; c++) {
            let s = sb[wr[c] + g];
            for (var t = 0u; t < RT; t++) { acc[t][c] += s.x * sq[t][c] + s.y * sx[t]; }
        }
    }
    for (var c = 0u; c < CR; c++) {
        let r = r0 + c;
        if (r >= p.nout) { break; }
        var b = 0.0;
        if (p.has_bias != 0u) { b = bias[r]; }
        for (var t = 0u; t < min(RT, p.rows); t++) {
            y[t * p.ystride + p.yoff + r] = acc[t][c] + b;
        }
    }
}
