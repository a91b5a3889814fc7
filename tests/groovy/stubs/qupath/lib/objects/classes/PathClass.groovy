package qupath.lib.objects.classes

/**
 * STAND-IN for QuPath's PathClass (not QuPath): a classification with a name and a packed RGB
 * colour. Like QuPath, classes are singletons per name ({@link #fromString}); a class created
 * without a colour gets one derived from its name.
 */
class PathClass {
    private static final Map<String, PathClass> SINGLETONS = [:]

    private final String name
    private Integer color

    private PathClass(String name, Integer color) {
        this.name = name
        this.color = color
    }

    /** QuPath 0.4+: the class of this name, created on first use. */
    static synchronized PathClass fromString(String name) {
        return fromString(name, null)
    }

    static synchronized PathClass fromString(String name, Integer rgb) {
        PathClass pc = SINGLETONS.get(name)
        if (pc == null) {
            int h = name.hashCode()
            Integer c = rgb != null ? rgb : (((40 + (h & 0x7f)) << 16) | ((40 + ((h >> 8) & 0x7f)) << 8) | (40 + ((h >> 16) & 0x7f)))
            pc = new PathClass(name, c)
            SINGLETONS.put(name, pc)
        }
        return pc
    }

    String getName() { return name }

    /** Packed RGB, as QuPath's PathClass.getColor(). */
    Integer getColor() { return color }

    @Override
    String toString() { return name }
}
