package qupath.lib.regions

/** STAND-IN for QuPath's ImageRegion (not QuPath): {@code createInstance} and the getters. */
class ImageRegion {
    final int x, y, width, height, z, t

    private ImageRegion(int x, int y, int width, int height, int z, int t) {
        this.x = x; this.y = y; this.width = width; this.height = height; this.z = z; this.t = t
    }

    static ImageRegion createInstance(int x, int y, int width, int height, int z, int t) {
        return new ImageRegion(x, y, width, height, z, t)
    }

    int getX() { return x }
    int getY() { return y }
    int getWidth() { return width }
    int getHeight() { return height }
}
